"""A ``world_size > 1`` training job under its JobContext: one owner (this worker process), many ranks.

The worker process keeps everything that makes the job one job: the lease (JobWorker's renewal
thread), cancel/fencing checks (``ctx.check()`` every POLL_SECONDS), progress events, the fenced
checkpoint uploads and the adapter publication. The ranks (torchrun children, see rank_group and
rank_main) only train; rank 0 writes checkpoints and the adapter locally and says so on its event
channel.

Outcomes: cancelled or fenced → every rank is SIGKILLed at once, nothing published; worker stopping →
the ranks agree to stop at a step boundary, rank 0 checkpoints, the job is released; a rank that dies
→ torchrun ends the others (``--max-restarts 0``) and the attempt fails with Unavailable, so the job
is redelivered (counted against max_deliveries) and resumes from its last checkpoint with the same
world_size (the checkpoint's fingerprint includes it).

Several machines (``nodes > 1``): this worker is node 0. It opens a run on the RunBoard (Redis) with its
rendezvous endpoint (``--rdzv-host``, a free port), starts its own ranks_per_node ranks as node 0, and
refreshes the run while it follows; workers started with ``--join-distributed`` claim the other node
ranks and start theirs against the endpoint (services.trainer.follower). Whatever ends the attempt, node
0 marks the run ended and the followers kill their ranks; a follower that dies takes its ranks with it,
torchrun on node 0 fails, and the attempt fails like a crashed rank; a follower that stops asks node 0 to
release the job (checkpoint, re-queue). The endpoint's port is ``--rdzv-port`` when the worker was given
one (TrainingHandler.rdzv_port, so a NetworkPolicy can name it), else a free port per attempt.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from loraflow import errors
from loraflow.errors import FailedPrecondition, Unavailable, WorkerStopping
from loraflow.jobs.embedded_redis import free_port
from loraflow.jobs.queue import JobContext
from loraflow.options.settings import RDZV_HOST
from services.trainer.rank_group import RankGroup
from services.trainer.rank_main import RankSpec
from services.trainer.run_board import RunBoard
from services.trainer.training import LoraSettings, StepProgress, TrainingSettings


class RankJobHost(Protocol):
    """What a data-parallel job needs of the worker's handler (services.trainer.worker.TrainingHandler), declared
    here so the worker imports this module and not the other way round."""

    store: Any
    cache_dir: Path
    allow_distributed: bool
    max_local_ranks: int
    rdzv_host: str
    rdzv_port: int | None
    join_timeout: float

    def report_step(self, ctx: JobContext, p: StepProgress) -> None: ...

    def latest_checkpoint(self, job_id: str) -> str | None: ...

    def publish_checkpoint(self, ctx: JobContext, step: int, directory: Path) -> None: ...

    def adapter_dir(self, ctx: JobContext) -> Path: ...

    def publish_adapter(self, ctx: JobContext, out: Path, name: str, trained_metrics: dict[str, float],
                        lora: LoraSettings, step: int, resumed: int) -> dict[str, Any]: ...


log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
_RELAYED_ERRORS = ("InvalidArgument", "FailedPrecondition", "NotFound", "PermissionDenied", "ResourceExhausted")


def check_capacity(handler: RankJobHost, training: TrainingSettings) -> None:
    """FailedPrecondition when this worker cannot host the job's ranks."""
    if not handler.allow_distributed:
        raise FailedPrecondition(f"training.world_size={training.world_size} needs a worker started with "
                                 "--allow-distributed-training (torch's c10d rendezvous store is unauthenticated, so "
                                 "distributed training is off unless the operator keeps the worker's ports private)",
                                 field="training.world_size", value=training.world_size)
    local = training.ranks_per_node
    if local > handler.max_local_ranks:
        raise FailedPrecondition(f"training.world_size={training.world_size} on {training.nodes} node(s) is {local} "
                                 f"ranks per machine, more than this worker runs (at most {handler.max_local_ranks} "
                                 "on one machine)", field="training.world_size", value=training.world_size)
    if training.device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < local:
            raise FailedPrecondition(f"training.world_size={training.world_size} on device 'cuda' needs one GPU "
                                     f"per rank ({local} on this machine); this worker has {have}",
                                     field="training.world_size", value=training.world_size)


def run_distributed_job(handler: RankJobHost, ctx: JobContext, model_dir: Path, data: bytes,
                        lora: LoraSettings, training: TrainingSettings) -> dict[str, Any]:
    check_capacity(handler, training)
    work = handler.cache_dir / "jobs" / ctx.job_id / f"attempt-{ctx.attempt}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rdzv_id = f"{ctx.job_id}-a{ctx.attempt}"
    board, run_key, endpoint = None, None, None
    if training.nodes > 1:
        board = RunBoard(ctx.queue.redis)
        probe = _probe_address(handler.rdzv_host)
        endpoint = f"{handler.rdzv_host}:{_rdzv_port(handler.rdzv_port, probe, ctx.job_id)}"
    group = RankGroup(work, training.ranks_per_node, rdzv_id=rdzv_id, nnodes=training.nodes, node_rank=0,
                      endpoint=endpoint)
    try:
        (work / "dataset.jsonl").write_bytes(data)
        resumed, resume_dir = 0, None
        latest = handler.latest_checkpoint(ctx.job_id)
        if board is not None:
            run_key = board.open(ctx.job_id, ctx.attempt, endpoint, training.nodes, training.ranks_per_node,
                                 latest or "")
        if latest is not None:
            resume_dir = handler.store.fetch_dir(latest, work / "resume")
            resumed = int(latest.rsplit("step-", 1)[-1])
        RankSpec(model_dir=str(model_dir), dataset_file=str(work / "dataset.jsonl"),
                 base_model=ctx.payload["base_model"], lora=lora.to_dict(), training=training.to_dict(),
                 resume_dir=str(resume_dir) if resume_dir else None, resumed_step=resumed,
                 out_dir=str(handler.adapter_dir(ctx)), worker_pid=os.getpid()).write(work)
        ctx.report(0.01, f"starting {training.world_size} ranks (torch.distributed)",
                   {"world_size": training.world_size})
        group.start()
        run = _Run(handler, ctx, group, training, resumed, board, run_key)
        rc = run.follow()
        if run.done is not None and rc == 0:
            out = Path(run.done["dir"])
            return handler.publish_adapter(ctx, out, ctx.payload["adapter_name"], run.done["metrics"], lora,
                                           int(run.done["step"]), resumed)
        if run.stopping:
            raise WorkerStopping(f"job {ctx.job_id} released at step {run.last_step}")
        if run.error is not None:
            raise run.error
        log.warning("ranks of job %s attempt %d exited with status %s; their output:\n%s", ctx.job_id,
                    ctx.attempt, rc, group.log_tail())
        raise Unavailable(f"a rank of job {ctx.job_id} attempt {ctx.attempt} exited (torchrun status {rc}) before "
                          f"training finished; the job is redelivered and resumes from its last checkpoint",
                          reason="RANK_FAILED")
    finally:
        if board is not None and run_key is not None:
            board.end(run_key)  # the followers kill their ranks
        group.kill()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(handler.adapter_dir(ctx), ignore_errors=True)  # rank 0's copy when the attempt failed


class _Run:
    """Follows rank 0's events and the job's control state until the rank group exits."""

    def __init__(self, handler: RankJobHost, ctx: JobContext, group: RankGroup, training: TrainingSettings,
                 resumed: int, board: RunBoard | None = None, run_key: str | None = None):
        self.handler, self.ctx, self.group, self.training = handler, ctx, group, training
        self.board, self.run_key = board, run_key
        self.join_deadline = time.monotonic() + handler.join_timeout
        self.resumed = resumed
        self.last_step = resumed
        self.stopping = False
        self.done: dict[str, Any] | None = None
        self.error: Exception | None = None

    def follow(self) -> int:
        while True:
            self._handle(self.group.read_events())
            rc = self.group.poll()
            if rc is not None:
                self._handle(self.group.read_events())  # what rank 0 wrote just before exiting
                return rc
            try:
                self.ctx.check()  # JobCancelled / LeaseLost propagate: the caller kills every rank
                if self.board is not None:
                    state = self.board.refresh(self.run_key)
                    if state.failed:
                        raise Unavailable(f"a follower node of job {self.ctx.job_id} attempt {self.ctx.attempt} "
                                          f"could not start its ranks: {state.failed}; the job is redelivered",
                                          reason="FOLLOWER_FAILED")
                    if state.claimed < self.training.nodes - 1 and time.monotonic() > self.join_deadline:
                        raise Unavailable(f"job {self.ctx.job_id} attempt {self.ctx.attempt}: {state.claimed} of "
                                          f"{self.training.nodes - 1} other nodes joined within "
                                          f"{self.handler.join_timeout:g}s (no idle worker with --join-distributed?); "
                                          "the job is redelivered", reason="NODES_MISSING")
                    if state.release:
                        raise WorkerStopping(f"a follower node of job {self.ctx.job_id} is stopping")
            except WorkerStopping:
                if not self.stopping:
                    self.stopping = True
                    self.group.request_stop()
            time.sleep(POLL_SECONDS)

    def _handle(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event["kind"]
            if kind == "started":
                self._started(event)
            elif kind == "step":
                progress = StepProgress(**event["progress"])
                self.last_step = progress.step
                self.handler.report_step(self.ctx, progress)
            elif kind == "checkpoint":
                self.handler.publish_checkpoint(self.ctx, int(event["step"]), Path(event["dir"]))
            elif kind == "done":
                self.done = event
            elif kind == "error":
                cls = getattr(errors, event["type"]) if event["type"] in _RELAYED_ERRORS else FailedPrecondition
                self.error = cls(event["message"], field=event.get("field"), value=event.get("value"))

    def _started(self, event: dict[str, Any]) -> None:
        total = int(event["total_steps"])
        metrics = {**event["metrics"], "step": self.resumed, "total_steps": total}
        if self.resumed:
            metrics["resumed_from_step"] = self.resumed
            message = f"resumed from the checkpoint at step {self.resumed} on {self.training.world_size} ranks"
        else:
            message = (f"training {total} steps on {event['train_examples']} examples "
                       f"({event['eval_examples']} eval) across {self.training.world_size} ranks")
        self.ctx.report(0.02 + 0.93 * self.resumed / total, message, metrics)


def _probe_address(host: str) -> str:
    """Where to look for a free port: the loopback itself, else every interface (torch binds all of them)."""
    try:
        return "127.0.0.1" if ipaddress.ip_address(host).is_loopback else "0.0.0.0"  # noqa: S104
    except ValueError:
        return "127.0.0.1" if host == "localhost" else "0.0.0.0"  # noqa: S104


def _rdzv_port(fixed: int | None, probe: str, job_id: str) -> int:
    """The fixed --rdzv-port when it is free here (else Unavailable: redelivered), or any free port."""
    if fixed is None:
        return free_port(probe)
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a just-closed store's TIME_WAIT is fine
            s.bind((probe, fixed))
    except OSError as exc:
        raise Unavailable(f"job {job_id}: the rendezvous port {fixed} (--rdzv-port) is in use on this machine "
                          f"({exc.strerror}); the job is redelivered", reason="RDZV_PORT_IN_USE") from None
    return fixed


def default_rdzv_host() -> str:
    return RDZV_HOST.raw() or socket.gethostname()
