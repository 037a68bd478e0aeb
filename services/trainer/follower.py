"""A worker started with ``--join-distributed``: it hosts the other nodes of multi-machine training jobs.

It watches the RunBoard for open runs (published by node 0, see distributed_job), claims one node rank,
and starts that node's ranks against node 0's rendezvous endpoint. It owns nothing of the job: node 0
renews the lease, reports, checkpoints and publishes. The payload comes from Redis, so the follower checks
it exactly as node 0 does (the dataclasses' validation, the InputPolicy for the base model, the store for
the dataset and the checkpoint key under the job's own prefix).

Ending: node 0 marks the run ended (success, cancel, crash, lease lost) or stops refreshing it (it died)
→ the follower kills its ranks at the next poll. This worker stopping → it asks node 0 to release the
job (every rank stops at one step, rank 0 checkpoints, the job is re-queued) and waits for the run to
end. A follower whose inputs fail tells node 0, which fails the attempt (redelivery) instead of waiting
for a node that never comes.

Pinned (``--role follower``, services.trainer.node_main): ``node_rank`` makes it claim that node rank only
(an Indexed Job's pod index), ``endpoint`` makes it join only the runs of the node 0 listening there (the
same Job's index-0 pod, through its headless Service name), so two Jobs sharing one Redis never mix.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path

import redis

from loraflow.errors import FailedPrecondition, LoraflowError
from loraflow.jobs.queue import JobQueue
from services.trainer.distributed_job import check_capacity
from services.trainer.rank_group import RankGroup
from services.trainer.rank_main import RankSpec
from services.trainer.run_board import RunBoard, RunRecord
from services.trainer.training import LoraSettings, TrainingSettings
from services.trainer.worker import TrainingHandler, checkpoint_prefix

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2


class RunFollower:
    """``run()`` until ``stop`` is set: claim nodes of open runs, one at a time."""

    def __init__(self, handler: TrainingHandler, queue: JobQueue, stop: threading.Event | None = None, *,
                 node_rank: int | None = None, endpoint: str | None = None):
        self.handler, self.queue = handler, queue
        self.board = RunBoard(queue.redis)
        self.stop = stop or threading.Event()
        self.node_rank = node_rank  # None: any free node rank
        self.endpoint = endpoint  # None: any node 0's runs
        self.runs_followed = 0
        # The last run hosted: (run, node, the ranks' exit status or None when killed).
        self.last: tuple[RunRecord, int, int | None] | None = None
        # Pinned to an endpoint: the last run of that node 0 which needs fewer nodes than node_rank + 1.
        self.not_needed: RunRecord | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.run_once()
            except redis.RedisError as exc:
                # Redis away: the ranks were killed (follow's finally); look again once it answers.
                log.warning("run board unreachable (%s); retrying", type(exc).__name__)
                self.stop.wait(1.0)
            except Exception:  # noqa: BLE001 - one bad run must not end the follower; node 0 times it out
                log.exception("following a run failed")
                self.stop.wait(1.0)
            self.stop.wait(POLL_SECONDS)

    def run_once(self) -> bool:
        """Claim and host one node of an open run, if any; whether one was hosted."""
        if self.handler.busy.is_set():
            return False
        for run in self.board.open_runs():
            if self.endpoint is not None and run.endpoint != self.endpoint:
                continue
            if self.node_rank is None:
                node = self.board.claim(run)
            elif self.node_rank >= run.nnodes:
                if self.endpoint is not None and self.not_needed != run:
                    log.info("job %s attempt %d spans %d nodes: node rank %d is not part of it", run.job_id,
                             run.attempt, run.nnodes, self.node_rank)
                    self.not_needed = run
                continue
            else:
                node = self.node_rank if self.board.claim_node(run, self.node_rank) else None
            if node is not None:
                self.last = (run, node, self.follow(run, node))
                return True
        return False

    def follow(self, run: RunRecord, node: int) -> int | None:
        """Host node ``node`` of ``run`` until the run ends; the ranks' exit status (None when killed)."""
        work = self.handler.cache_dir / "follow" / run.job_id / f"attempt-{run.attempt}-node-{node}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        group = RankGroup(work, run.nproc, rdzv_id=f"{run.job_id}-a{run.attempt}", nnodes=run.nnodes,
                          node_rank=node, endpoint=run.endpoint)
        try:
            try:
                self._prepare(run, work)
            except LoraflowError as exc:
                log.warning("cannot host node %d of job %s attempt %d: %s", node, run.job_id, run.attempt, exc)
                self.board.fail(run.key, exc.message)
                return None
            except (KeyError, TypeError, ValueError, OSError) as exc:
                # A malformed payload or an unreadable cache: say which, never what a file held.
                log.exception("cannot host node %d of job %s attempt %d", node, run.job_id, run.attempt)
                self.board.fail(run.key, f"node {node} could not prepare its inputs ({type(exc).__name__})")
                return None
            group.start()
            log.info("hosting node %d/%d of job %s attempt %d (%d ranks, rendezvous %s)", node, run.nnodes,
                     run.job_id, run.attempt, run.nproc, run.endpoint)
            asked = False
            while True:
                rc = group.poll()
                if rc is not None:
                    if rc != 0:
                        log.warning("node %d of job %s exited with %s; its output:\n%s", node, run.job_id, rc,
                                    group.log_tail())
                    return rc
                if not self.board.is_open(run.key):
                    return None  # node 0 ended the attempt (or died): the finally kills our ranks
                if self.stop.is_set() and not asked:
                    self.board.ask_release(run.key)
                    asked = True
                time.sleep(POLL_SECONDS)
        finally:
            group.kill()
            shutil.rmtree(work, ignore_errors=True)
            self.runs_followed += 1

    def _prepare(self, run: RunRecord, work: Path) -> None:
        """The node's RankSpec from the job as Redis holds it, checked like node 0 checks it."""
        job = self.queue.find(run.job_id)
        if job is None or job.state != "RUNNING" or job.attempt != run.attempt:
            raise FailedPrecondition(f"job {run.job_id} attempt {run.attempt} is not running any more")
        p = job.payload
        lora, training = LoraSettings(**p["lora"]), TrainingSettings(**p["training"])
        if (training.nodes, training.ranks_per_node) != (run.nnodes, run.nproc):
            raise FailedPrecondition(f"job {run.job_id}: the run's layout ({run.nnodes} x {run.nproc}) is not the "
                                f"job's ({training.nodes} x {training.ranks_per_node})")
        check_capacity(self.handler, training)
        model_dir = self.handler.base_model_dir(p["base_model"])
        (work / "dataset.jsonl").write_bytes(self.handler.store.get_bytes(p["dataset_key"]))
        resume_dir = None
        if run.resume_key:
            if not run.resume_key.startswith(checkpoint_prefix(run.job_id) + "/step-"):
                raise FailedPrecondition(f"job {run.job_id}: the run's checkpoint is not one of the job's")
            resume_dir = self.handler.store.fetch_dir(run.resume_key, work / "resume")
        RankSpec(model_dir=str(model_dir), dataset_file=str(work / "dataset.jsonl"), base_model=p["base_model"],
                 lora=lora.to_dict(), training=training.to_dict(),
                 resume_dir=str(resume_dir) if resume_dir else None,
                 resumed_step=int(run.resume_key.rsplit("step-", 1)[-1]) if run.resume_key else 0,
                 out_dir=str(work / "unused-adapter"), worker_pid=os.getpid()).write(work)
