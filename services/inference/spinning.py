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
  graph on CPU), a second, sleeping session over the same weights file, cache and banks takes the steps while
  other processes contend for the cores: ``HostContention`` samples the run queue (``/proc/loadavg``) less
  this process's own running threads, smoothed, with hysteresis, at most every ``SAMPLE_S`` seconds. The
  sleeping session is opened (in the background, steps go on meanwhile) the first time contention is seen,
  so a dedicated host never pays for it; once open it costs the weights' packed copies a second time
  (``OrtRuntime.memory_bytes`` counts it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from loraflow.errors import InvalidArgument
from loraflow.options.settings import ORT_SPINNING

SPINNING_POLICIES = ("auto", "on", "off")
SPINNING_ENV = ORT_SPINNING.env
DEFAULT_SPINNING = ORT_SPINNING.default
SPINNING_HELP = ORT_SPINNING.described()
# How often contention is sampled (reading /proc costs ~0.1 ms; a step costs milliseconds).
SAMPLE_S = 0.5
# Smoothing of the samples (an exponential moving average): a burst of one sample does not switch.
SMOOTHING = 0.3
# Other processes' runnable threads beyond the cores ours leave free, above which the host counts as contended,
# and below which as quiet again (hysteresis: no flapping at the edge).
CONTENDED_ABOVE = 0.75
QUIET_BELOW = 0.25


def check_spinning(value: str, field: str = "ort_spinning") -> str:
    if value not in SPINNING_POLICIES:
        raise InvalidArgument(f"{field} must be one of {', '.join(SPINNING_POLICIES)}, got {value!r}", field=field,
                              value=value)
    return value


def spinning_from_env(environ=None) -> str:
    """The policy LORAFLOW_ORT_SPINNING names (the registry's setting), else the default."""
    return check_spinning(ORT_SPINNING.from_env(environ), SPINNING_ENV)


def others_runnable(proc: Path = Path("/proc")) -> int | None:
    """Runnable threads of other processes now: the kernel's run queue (``/proc/loadavg``'s running count)
    less this process's own running threads. Their demand shows even while our spinning threads starve them
    (their CPU time would not). None where /proc cannot say."""
    try:
        running = int((proc / "loadavg").read_text().split()[3].split("/")[0])
        own = 0
        for stat in (proc / "self" / "task").glob("*/stat"):
            try:
                # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces and parentheses).
                if stat.read_text().rsplit(")", 1)[1].split()[0] == "R":
                    own += 1
            except (OSError, IndexError):
                continue  # a thread that ended meanwhile
    except (OSError, IndexError, ValueError):
        return None
    return max(0, running - own)


class HostContention:
    """Whether other processes want the cores this process's ONNX Runtime threads use, sampled at most every
    ``sample_s`` seconds (the engine asks before every step)."""

    def __init__(self, *, own_threads: int, cores: int | None = None, sample_s: float = SAMPLE_S,
                 others: Callable[[], float | None] = others_runnable, clock: Callable[[], float] = time.monotonic):
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores
        self.own_threads = max(1, min(own_threads or cores, cores))
        self.free_cores = self.cores - self.own_threads  # others may run this many threads without contention
        self.sample_s = sample_s
        self._others = others
        self._clock = clock
        self._next = 0.0
        self.others_smoothed: float | None = None
        self.contended = False

    def check(self) -> bool:
        now = self._clock()
        if now >= self._next:
            self._next = now + self.sample_s
            value = self._others()
            if value is not None:
                previous = self.others_smoothed
                self.others_smoothed = value if previous is None else previous + SMOOTHING * (value - previous)
                excess = self.others_smoothed - self.free_cores
                if self.contended and excess < QUIET_BELOW:
                    self.contended = False
                elif not self.contended and excess > CONTENDED_ABOVE:
                    self.contended = True
        return self.contended
