"""The ONNX Runtime threading policy of a served model: whether intra-op threads busy-wait (spin).

ONNX Runtime fixes ``session.intra_op.allow_spinning`` per session (no run option changes it), and the
choice matters both ways: spinning threads pick up each parallel section at once (SmolLM2-135M, 8 mixed
rows, 2 threads, quiet host: 0.88x onnxruntime-genai spinning vs 0.69x sleeping), but on a host whose
cores other processes want, a spinning thread takes a core's time slices from the threads doing the work
(0.3-0.45x genai at load 4-10).

Policies (``--ort-spinning``, env ``LORAFLOW_ORT_SPINNING``):

* ``on``: spin, as ONNX Runtime does by default (threads keep spinning between calls, too);
* ``off``: idle threads sleep;
* ``auto`` (default): spin only while a call runs (``session.force_spinning_stop``: no core burnt while
  the engine samples or waits for requests), and, for graphs whose cache two sessions can share (the fused
  graph), a second, sleeping session over the same cache and banks takes the steps while the host is
  contended: ``HostContention`` samples the kernel's CPU pressure (``/proc/pressure/cpu``, else the run
  queue of ``/proc/loadavg``) at most every ``SAMPLE_S`` seconds, with hysteresis.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from loraflow.errors import InvalidArgument

SPINNING_POLICIES = ("auto", "on", "off")
SPINNING_ENV = "LORAFLOW_ORT_SPINNING"
DEFAULT_SPINNING = "auto"
SPINNING_HELP = ("ONNX Runtime threading policy: 'auto' spins only while a step runs and switches to sleeping "
                 "threads while other processes contend for the CPU; 'on' always spins (fastest on a dedicated "
                 "host, collapses on a busy one); 'off' never spins (env LORAFLOW_ORT_SPINNING; default auto)")
# How often contention is sampled (reading /proc costs ~20 us; a step costs milliseconds).
SAMPLE_S = 0.5
# CPU pressure ("some" avg10: % of time some runnable task waited for a core) above which the host counts as
# contended, and below which it counts as quiet again (hysteresis: no flapping at the edge).
PRESSURE_HIGH = 25.0
PRESSURE_LOW = 10.0


def check_spinning(value: str, field: str = "ort_spinning") -> str:
    if value not in SPINNING_POLICIES:
        raise InvalidArgument(f"{field} must be one of {', '.join(SPINNING_POLICIES)}, got {value!r}", field=field,
                              value=value)
    return value


def spinning_from_env(environ=os.environ) -> str:
    return check_spinning(environ.get(SPINNING_ENV) or DEFAULT_SPINNING, SPINNING_ENV)


def _cpu_pressure(path: Path = Path("/proc/pressure/cpu")) -> float | None:
    """The kernel's 10 s CPU pressure ("some avg10", percent), or None where PSI is off."""
    try:
        first = path.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    fields = dict(f.split("=", 1) for f in first[1:] if "=" in f)
    try:
        return float(fields["avg10"])
    except (KeyError, ValueError):
        return None


def _run_queue_pressure(cores: int, own_threads: int, path: Path = Path("/proc/loadavg")) -> float | None:
    """Runnable tasks other than ours beyond the free cores, as a percent of the cores (a PSI stand-in)."""
    try:
        running = int(path.read_text().split()[3].split("/")[0])
    except (OSError, IndexError, ValueError):
        return None
    others = max(0, running - own_threads)
    return 100.0 * max(0, others + own_threads - cores) / max(1, cores)


class HostContention:
    """Whether other processes contend for this host's CPU, sampled at most every ``sample_s`` seconds."""

    def __init__(self, *, own_threads: int, cores: int | None = None, sample_s: float = SAMPLE_S,
                 pressure: Callable[[], float | None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        self.own_threads = max(1, own_threads)
        self.sample_s = sample_s
        self._pressure = pressure or self._host_pressure
        self._clock = clock
        self._next = 0.0
        self.contended = False
        self.last_pressure: float | None = None

    def _host_pressure(self) -> float | None:
        value = _cpu_pressure()
        return value if value is not None else _run_queue_pressure(self.cores, self.own_threads)

    def check(self) -> bool:
        now = self._clock()
        if now >= self._next:
            self._next = now + self.sample_s
            value = self._pressure()
            self.last_pressure = value
            if value is not None:
                if self.contended and value < PRESSURE_LOW:
                    self.contended = False
                elif not self.contended and value > PRESSURE_HIGH:
                    self.contended = True
        return self.contended
