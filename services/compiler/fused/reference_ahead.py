"""The verification reference computed while the graph is still being written.

The fused artifact's recording feeds decode tokens from the scenario's seed, so the rows the reference is
asked for are known before any graph exists (services/compiler/verify.py ``scenario_rows``), and what reads
only the checkpoint can run before the artifact exists: an fp32 artifact's whole reference, and an int4/int8
one's float-model variants (float64 and float32 over the error rows, ``verify.float_reference``; the checked
variants read the written weights back and run in verification). ``ReferenceAhead`` starts that pass on a
thread of its own as the export starts: the export leaves a core partly idle (the builder's thread converts
or quantises while the writer thread writes and hashes), which the layer-by-layer reference fills, instead of
competing with the layer ranges' replay afterwards. Verification then asks it for the same rows and gets the
finished pass (different rows are refused: the check would compare against another scenario).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Generic, TypeVar

from loraflow.errors import LoraflowError
from services.compiler.modeling.layerwise import ReferenceRow

# What the pass returns: verify.Reference (fp32's whole reference) or the float variants' results (int4/int8).
Result = TypeVar("Result")
# A reference function taking a per-layer hook (services/compiler/verify.py ``layerwise_reference``'s or
# ``float_reference``'s ``on_layer``): the hook lets ``cancel`` stop the pass at the next layer.
HookedReference = Callable[[Callable[[Mapping], None]], Callable[[Sequence[ReferenceRow]], Result]]


class ReferenceCancelled(LoraflowError):
    """The pass was stopped (the export failed or the job was cancelled)."""

    default_reason = "CANCELLED"


class ReferenceAhead(Generic[Result]):
    """``make(on_layer)`` (a reference pass over the checkpoint) run over ``rows`` on a thread from
    construction; calling the object with the same rows waits for that pass and returns it."""

    def __init__(self, make: HookedReference[Result], rows: Sequence[ReferenceRow]):
        self.rows = list(rows)
        self.seconds = 0.0  # the pass's own wall time
        self._stop = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._reference = make(self._check_stop)
        self._thread = threading.Thread(target=self._run, name="reference-ahead", daemon=True)
        self._thread.start()

    def _check_stop(self, loaded: Mapping) -> None:
        if self._stop.is_set():
            raise ReferenceCancelled("the verification reference was cancelled")

    def _run(self) -> None:
        t0 = time.perf_counter()
        try:
            self._result = self._reference(self.rows)
        except BaseException as err:  # noqa: BLE001  (raised on the caller's thread)
            self._error = err
        self.seconds = time.perf_counter() - t0

    def __call__(self, rows: Sequence[ReferenceRow]) -> Result:
        if list(rows) != self.rows:
            raise RuntimeError(f"verification asked for {len(rows)} rows other than the {len(self.rows)} the reference "
                               "was started on")
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop the pass at its next layer (a no-op once it finished) and wait for its thread."""
        self._stop.set()
        self._thread.join()
