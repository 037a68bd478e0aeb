"""The ranks of one distributed training attempt, as seen from the worker process that owns the job.

The worker launches ``python -m torch.distributed.run`` (torchrun: one elastic agent, c10d rendezvous
on a loopback port, ``--max-restarts 0`` so a crashed rank fails the attempt instead of restarting
it) in a session of its own. Rank 0 talks back through ``events.jsonl`` in the run directory (one JSON
object a line, appended and flushed; the reader takes complete lines only); the worker asks for a
stop by creating ``stop``; each rank writes its pid under ``pids/`` so the worker can SIGKILL every
rank directly (torchrun starts each rank in a new session, out of reach of the agent's group).

Across machines (``nnodes > 1``) every node runs one such agent with ``--rdzv-backend=static``, its
``--node-rank`` and node 0's endpoint, so global rank 0 is always on node 0 (see distributed_job and
follower).

Security: the c10d store and gloo's sockets are not authenticated (torch has no auth for them); on one
machine the rendezvous endpoint is 127.0.0.1 and gloo is pinned to the loopback interface. Across
machines they must stay on a private network (see deploy/k8s/training-distributed/networkpolicy.yaml).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from loraflow.jobs.embedded_redis import free_port

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"
PIDS_DIR = "pids"
SPEC_FILE = "spec.json"
LOG_FILE = "ranks.log"


class EventWriter:
    """Rank 0's side of the channel: one flushed JSON line per event."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / EVENTS_FILE

    def write(self, kind: str, **fields: Any) -> None:
        line = json.dumps({"kind": kind, **fields}) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


class RankGroup:
    """Start, watch, stop and kill the torchrun process tree of one attempt."""

    def __init__(self, run_dir: Path, world_size: int, rdzv_id: str, *, nnodes: int = 1, node_rank: int = 0,
                 endpoint: str | None = None):
        self.run_dir = Path(run_dir)
        self.world_size = int(world_size)  # the ranks of this machine (nproc per node)
        self.rdzv_id = rdzv_id
        self.nnodes, self.node_rank = int(nnodes), int(node_rank)
        # Multi-machine: node 0's endpoint HOST:PORT (see distributed_job); one machine: a loopback port.
        self.endpoint = endpoint
        self.proc: subprocess.Popen | None = None
        self._offset = 0
        (self.run_dir / PIDS_DIR).mkdir(parents=True, exist_ok=True)

    def command(self, port: int) -> list[str]:
        if self.nnodes == 1:
            rdzv = ["--nnodes=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
        else:
            # static rendezvous: node ranks are fixed, so global rank 0 (the one that reports, checkpoints and
            # writes the adapter) runs on node 0, whose agent hosts the store on the endpoint.
            rdzv = [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=static",
                    f"--rdzv-endpoint={self.endpoint}"]
        return [sys.executable, "-m", "torch.distributed.run", *rdzv, f"--nproc-per-node={self.world_size}",
                f"--rdzv-id={self.rdzv_id}", "--max-restarts=0", "--monitor-interval=0.2",
                "-m", "services.trainer.rank_main", str(self.run_dir / SPEC_FILE)]

    def _gloo_interface(self) -> str | None:
        """Loopback when every rank is on this machine (or the endpoint is loopback); else gloo picks."""
        if self.nnodes == 1:
            return "lo"
        host = (self.endpoint or "").rsplit(":", 1)[0].strip("[]")
        return "lo" if host in ("127.0.0.1", "localhost", "::1") else os.environ.get("GLOO_SOCKET_IFNAME")

    def start(self) -> None:
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        interface = self._gloo_interface()
        if interface:
            env["GLOO_SOCKET_IFNAME"] = interface
        # One thread per rank unless the operator set it: W ranks on W cores, not W x cores threads.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.world_size)))
        with open(self.run_dir / LOG_FILE, "ab") as out:
            self.proc = subprocess.Popen(self.command(free_port()), cwd=REPO_ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.info("started %d ranks for %s (torchrun pid %d)", self.world_size, self.rdzv_id, self.proc.pid)

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def read_events(self) -> list[dict[str, Any]]:
        """Events rank 0 appended since the last call (complete lines only)."""
        path = self.run_dir / EVENTS_FILE
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        return [json.loads(line) for line in chunk[:end].splitlines() if line.strip()]

    def request_stop(self) -> None:
        (self.run_dir / STOP_FILE).touch()

    def rank_pids(self) -> list[int]:
        pids = []
        for p in sorted((self.run_dir / PIDS_DIR).glob("rank-*")):
            try:
                pids.append(int(p.read_text()))
            except (OSError, ValueError):
                continue
        return pids

    def kill(self) -> None:
        """SIGKILL every rank and the agent now (cancel, fencing, a crashed peer)."""
        if self.proc is None:
            return
        for pid in self.rank_pids():
            if _runs_rank_entry(pid):  # a recorded pid may have exited and been reused
                _kill(pid)
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            log.error("torchrun agent %d of %s did not exit after SIGKILL", self.proc.pid, self.rdzv_id)

    def log_tail(self, limit: int = 4000) -> str:
        """The ranks' output, for the worker's own log only (it may quote input files)."""
        try:
            return (self.run_dir / LOG_FILE).read_bytes()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _runs_rank_entry(pid: int) -> bool:
    """A recorded rank pid is ours only while it still runs the rank entry point."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"services.trainer.rank_main" in cmdline


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids still running (zombies count as gone) after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if process_running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def process_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "")
    return state not in ("Z", "X")
