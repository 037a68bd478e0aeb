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
  other processes contend for the cores: ``HostContention`` samples the CPU time other processes used on this
  process's cores (``OthersCpu``), smoothed, with hysteresis, at most every ``SAMPLE_S`` seconds. The
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
# Cores' worth of CPU time other processes use beyond the cores ours leave free, above which the host counts as
# contended, and below which as quiet again (hysteresis: no flapping at the edge). One CPU-bound process against
# two spinning threads on two cores gets ~0.67 of a core; an idle host's daemons use ~0.02.
CONTENDED_ABOVE = 0.5
QUIET_BELOW = 0.2
# A check this long after the last step ended follows an idle spell: what other processes did meanwhile (e.g. a
# batch job that has finished) says nothing about contention now, so the window restarts instead of counting it.
IDLE_AFTER_S = SAMPLE_S


def check_spinning(value: str, field: str = "ort_spinning") -> str:
    if value not in SPINNING_POLICIES:
        raise InvalidArgument(f"{field} must be one of {', '.join(SPINNING_POLICIES)}, got {value!r}", field=field,
                              value=value)
    return value


def spinning_from_env(environ=None) -> str:
    """The policy LORAFLOW_ORT_SPINNING names (the registry's setting), else the default."""
    return check_spinning(ORT_SPINNING.from_env(environ), SPINNING_ENV)


class OthersCpu:
    """Cores' worth of CPU time that other processes used on this process's CPUs since the previous call
    (``/proc/stat``'s per-CPU busy ticks on the affinity set, less ``/proc/self/stat``'s own ticks).

    CPU time, not the run queue: the kernel's instantaneous runnable count caught passing daemons and our own
    threads in the middle of a state change, and switched a quiet host's steps to the sleeping session (58-341
    of 391 steps of a SmolLM2 bench on an idle 2-core host). A process that wants a core gets some of it under
    the kernel's fair scheduler even while our threads spin (two burners against two spinning threads still
    take about one core), so its demand shows. None for the first call (no window yet) or where /proc cannot
    say."""

    # Of the values after "cpuN": user nice system [idle iowait] irq softirq steal (guest is inside user).
    BUSY_FIELDS = (0, 1, 2, 5, 6, 7)

    def __init__(self, proc: Path = Path("/proc"), *, cpus: set[int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if cpus is None:
            cpus = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.proc = proc
        self.cpus = cpus
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._clock = clock
        self._last: tuple[float, int, int] | None = None

    def _busy_ticks(self) -> int:
        busy, seen = 0, 0
        for line in (self.proc / "stat").read_text().splitlines():
            name, _, values = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu":
                continue
            if self.cpus is not None and int(name[3:]) not in self.cpus:
                continue
            fields = [int(v) for v in values.split()]
            busy += sum(fields[i] for i in self.BUSY_FIELDS)
            seen += 1
        if not seen:
            raise ValueError("no per-CPU line of this process's CPUs in /proc/stat")
        return busy

    def _own_ticks(self) -> int:
        # "pid (comm) S ppid ...": fields after the last ')' start at the state; utime and stime are 12th/13th.
        fields = (self.proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def __call__(self) -> float | None:
        try:
            now, busy, own = self._clock(), self._busy_ticks(), self._own_ticks()
        except (OSError, IndexError, ValueError):
            return None
        last, self._last = self._last, (now, busy, own)
        if last is None or now <= last[0]:
            return None
        others = (busy - last[1]) - (own - last[2])
        return max(0.0, others / (self.ticks_per_s * (now - last[0])))


class HostContention:
    """Whether other processes want the cores this process's ONNX Runtime threads use, sampled at most every
    ``sample_s`` seconds (the engine asks before every step and says when each step ended: a window that spans
    an idle spell is dropped, not counted)."""

    def __init__(self, *, own_threads: int, cores: int | None = None, sample_s: float = SAMPLE_S,
                 others: Callable[[], float | None] | None = None, clock: Callable[[], float] = time.monotonic):
        if cores is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores
        self.own_threads = max(1, min(own_threads or cores, cores))
        self.free_cores = self.cores - self.own_threads  # others may run this many threads without contention
        self.sample_s = sample_s
        self._others = OthersCpu() if others is None else others
        self._clock = clock
        self._next = 0.0
        self._step_ended: float | None = None
        self.others_smoothed: float | None = None
        self.contended = False

    def step_ended(self) -> None:
        self._step_ended = self._clock()

    def check(self) -> bool:
        now = self._clock()
        if self._step_ended is not None and now - self._step_ended > IDLE_AFTER_S:
            # Measured: a bench's serving process idle while another opened its model came back contended and
            # took 28 of its next 68 steps on the sleeping session, which it opened for them (+0.9 GB).
            self._step_ended = None
            self._others()  # starts a new window now; the decision so far stands until it is sampled
            self._next = now + self.sample_s
            return self.contended
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
