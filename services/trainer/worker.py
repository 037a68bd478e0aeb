"""The training job handler: fetch base model + dataset, train with progress events, checkpoint to the
store, resume a redelivered job from its latest checkpoint, publish and register the adapter.

Store layout (keys):
    checkpoints/{job_id}/step-{N:08d}/     resumable checkpoints (only the latest is kept)
    adapters/{name}/{job_id}-a{attempt}/   the published adapter (unique per job and attempt)
    datasets/{sha256}.jsonl                written by the API at submit time
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from loraflow.errors import AlreadyExists, FailedPrecondition, InvalidArgument, WorkerStopping
from loraflow.jobs.queue import JobContext
from loraflow.jobs.registry import AdapterRecord, Registry
from loraflow.options.budget import ResourceBudget, process_budget
from loraflow.options.hf_config import HfModelConfig, read_config_file
from loraflow.storage.model_source import InputPolicy, materialize
from loraflow.storage.store import ObjectStore, adapter_key, sha256_file
from services.trainer.dataset import build_splits, parse_jsonl
from services.trainer.job_memory import estimate_training
from services.trainer.training import (
    LOSS_CURVE_FILE,
    LoraSettings,
    StepProgress,
    TrainingCallback,
    TrainingSettings,
    build_trainer,
)

log = logging.getLogger(__name__)


def checkpoint_prefix(job_id: str) -> str:
    return f"checkpoints/{job_id}"


def _step_of(key: str) -> int:
    return int(key.rsplit("step-", 1)[-1])


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _JobCallback(TrainingCallback):
    """Bridges the training loop to the job: progress events, cancellation, fenced checkpoints."""

    def __init__(self, handler: TrainingHandler, ctx: JobContext, stop: threading.Event):
        self.handler = handler
        self.ctx = ctx
        self.stop = stop
        self.last_checkpoint_step = 0
        self.last_report = 0.0

    def on_step(self, p: StepProgress) -> None:
        # Cancelled / fenced → the exception ends training at once (nothing is published);
        # worker stopping → finish this step, then checkpoint and release (see TrainingHandler).
        try:
            self.ctx.check()
        except WorkerStopping:
            self.stop.set()
        self.handler.report_step(self.ctx, p)

    def on_checkpoint(self, step: int, directory: Path) -> None:
        self.handler.publish_checkpoint(self.ctx, step, directory)
        self.last_checkpoint_step = step


class TrainingHandler:
    """``handler(ctx) -> result`` for loraflow.jobs.queue.JobWorker on the "train" queue."""

    def __init__(self, store: ObjectStore, registry: Registry, cache_dir: str | Path, *,
                 report_every_steps: int = 5, metrics=None, inputs: InputPolicy | None = None,
                 allow_distributed: bool = False, max_local_ranks: int | None = None, rdzv_host: str | None = None,
                 join_timeout: float = 300.0, rdzv_port: int | None = None, budget: ResourceBudget | None = None):
        self.store = store
        self._budget = budget  # None: the process's (loraflow.options.budget.process_budget)
        # world_size > 1 is opt-in: the ranks' c10d store is unauthenticated (see services.trainer.rank_group).
        self.allow_distributed = bool(allow_distributed)
        # Ranks one job may start on this machine (oversubscribing cores only slows every rank down).
        self.max_local_ranks = max_local_ranks or max(2, 2 * (os.cpu_count() or 1))
        # nodes > 1: the address the other machines reach this worker's rendezvous endpoint on.
        from services.trainer.distributed_job import default_rdzv_host

        self.rdzv_host = rdzv_host or default_rdzv_host()
        # ...and the port node 0's c10d store listens on (None: any free port, chosen per attempt).
        if rdzv_port is not None and not 1 <= int(rdzv_port) <= 65535:
            raise InvalidArgument(f"rdzv_port must be in 1..65535, got {rdzv_port!r}", field="rdzv_port",
                                  value=rdzv_port)
        self.rdzv_port = None if rdzv_port is None else int(rdzv_port)
        self.join_timeout = float(join_timeout)  # how long node 0 waits for the other nodes to be claimed
        self.busy = threading.Event()  # a queue job runs here: a follower thread does not claim nodes meanwhile
        # Checked again here, not only at submit: the payload in Redis could have been planted.
        self.inputs = inputs or InputPolicy()
        self.registry = registry
        self.cache_dir = Path(cache_dir)
        self.report_every_steps = max(1, int(report_every_steps))
        self.metrics = metrics  # optional services.trainer.metrics-like object with observe_step/observe_job

    @property
    def budget(self) -> ResourceBudget:
        return self._budget or process_budget()

    def check_budget(self, model_dir: Path, lora: LoraSettings, training: TrainingSettings) -> None:
        """Before any weight is loaded: the model (as this worker reads it) must be sane and fit the budget
        (a payload in Redis may not be what the API checked, and the API may run with another budget)."""
        model = HfModelConfig.from_dict(read_config_file(model_dir / "config.json", field="base_model",
                                                         shown="base_model config.json"), field="base_model")
        self.budget.check(estimate_training(model, lora, training), field="base_model")

    def on_metrics(self, p: StepProgress) -> None:
        if self.metrics is not None:
            self.metrics.observe_step(p)

    def report_step(self, ctx: JobContext, p: StepProgress) -> None:
        """A progress event for step p when one is due (every report_every_steps, first, last, eval)."""
        due = p.step % self.report_every_steps == 0 or p.step in (1, p.total_steps) or p.eval_loss is not None
        if not due:
            return
        metrics = {"step": p.step, "loss": p.loss, "learning_rate": p.learning_rate,
                   "tokens_per_second": p.tokens_per_second, "epoch": p.epoch, "total_steps": p.total_steps}
        if p.eval_loss is not None:
            metrics["eval_loss"] = p.eval_loss
        message = f"step {p.step}/{p.total_steps} loss {p.loss:.4f}"
        if p.eval_loss is not None:
            message += f" eval_loss {p.eval_loss:.4f}"
        message += f", eta {_fmt_eta(p.eta_seconds)}"
        ctx.report(0.02 + 0.93 * p.step / p.total_steps, message, metrics)
        self.on_metrics(p)

    # --- inputs --------------------------------------------------------------------------------

    def base_model_dir(self, base_model: str) -> Path:
        """A local checkpoint dir: as given, or fetched from the store into the cache (sha256-verified)."""
        try:
            path = materialize(base_model, self.store, self.cache_dir, field="base_model", kind="models",
                               policy=self.inputs)
        except InvalidArgument:
            path = None
        if path is None or not (path / "config.json").is_file():
            raise FailedPrecondition(f"base_model {base_model!r} is not readable on this worker",
                                     field="base_model", value=base_model)
        return path

    def latest_checkpoint(self, job_id: str) -> str | None:
        keys = [k for k in self.store.list_dirs(checkpoint_prefix(job_id)) if "step-" in k]
        return max(keys, key=_step_of) if keys else None

    # --- fenced writes -------------------------------------------------------------------------

    @staticmethod
    def fence(ctx: JobContext) -> None:
        """Raise unless this attempt still owns the job (a stopping worker may still write its checkpoint)."""
        try:
            ctx.check()
        except WorkerStopping:
            pass

    def publish_checkpoint(self, ctx: JobContext, step: int, directory: Path) -> None:
        self.fence(ctx)
        key = f"{checkpoint_prefix(ctx.job_id)}/step-{step:08d}"
        self.store.publish_dir(key, directory)
        # Older checkpoints are superseded once the new one is complete.
        for old in self.store.list_dirs(checkpoint_prefix(ctx.job_id)):
            if old != key:
                self.store.delete(old)
        shutil.rmtree(directory, ignore_errors=True)
        ctx.report(ctx_progress(ctx), f"checkpoint at step {step}", {"step": step, "checkpoint_step": step})

    # --- the job -------------------------------------------------------------------------------

    def __call__(self, ctx: JobContext) -> dict[str, Any]:
        self.busy.set()
        try:
            return self._run_job(ctx)
        finally:
            self.busy.clear()

    def _run_job(self, ctx: JobContext) -> dict[str, Any]:
        p = ctx.payload
        lora = LoraSettings(**p["lora"])
        training = TrainingSettings(**p["training"])
        name = p["adapter_name"]
        ctx.report(0.0, f"attempt {ctx.attempt}: fetching base model and dataset")
        model_dir = self.base_model_dir(p["base_model"])
        self.check_budget(model_dir, lora, training)
        data = self.store.get_bytes(p["dataset_key"])
        if training.world_size > 1:
            from services.trainer.distributed_job import run_distributed_job

            return run_distributed_job(self, ctx, model_dir, data, lora, training)
        records = parse_jsonl(data, field="dataset_uri")
        work = self.cache_dir / "jobs" / ctx.job_id / f"attempt-{ctx.attempt}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stop = threading.Event()
        callback = _JobCallback(self, ctx, stop)
        try:
            trainer = build_trainer(
                model_dir,
                lambda tok: build_splits(tok, records, max_seq_len=training.max_seq_len,
                                         eval_fraction=training.eval_fraction, seed=training.seed),
                lora, training, work_dir=work, callback=callback, stop=stop)
            resumed = 0
            latest = self.latest_checkpoint(ctx.job_id)
            if latest is not None:
                resumed = trainer.resume_from(self.store.fetch_dir(latest, work / "resume"))
                callback.last_checkpoint_step = resumed
                ctx.report(0.02 + 0.93 * resumed / trainer.total_steps,
                           f"resumed from the checkpoint at step {resumed}", {"step": resumed,
                                                                              "resumed_from_step": resumed})
            else:
                ctx.report(0.02, f"training {trainer.total_steps} steps on {len(trainer.splits.train)} examples "
                                 f"({len(trainer.splits.eval)} eval)",
                           {"step": 0, "total_steps": trainer.total_steps})
            outcome = trainer.train()
            if not outcome.completed:
                # The worker is stopping: save where we are, then hand the job back to the queue.
                if trainer.step > callback.last_checkpoint_step:
                    self.publish_checkpoint(ctx, trainer.step, trainer.save_checkpoint())
                raise WorkerStopping(f"job {ctx.job_id} released at step {trainer.step}")
            return self._publish(ctx, trainer, name, resumed)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def adapter_dir(self, ctx: JobContext) -> Path:
        return self.cache_dir / "jobs" / ctx.job_id / f"adapter-a{ctx.attempt}"

    def _publish(self, ctx: JobContext, trainer, name: str, resumed: int) -> dict[str, Any]:
        out = trainer.save_adapter(self.adapter_dir(ctx), extra_metrics={"resumed_from_step": float(resumed)},
                                   base_model=ctx.payload["base_model"])
        return self.publish_adapter(ctx, out, name, trainer.metrics(), trainer.lora, trainer.step, resumed)

    def publish_adapter(self, ctx: JobContext, out: Path, name: str, trained_metrics: dict[str, float],
                        lora: LoraSettings, step: int, resumed: int) -> dict[str, Any]:
        """Fenced: the adapter dir in the store, then the result and the registry entry in one transaction."""
        p = ctx.payload
        try:
            existing = self.registry.find_adapter(name)
            if existing is not None and existing.job_id != ctx.job_id:
                raise AlreadyExists(f"adapter {name!r} was registered by job {existing.job_id} meanwhile",
                                    field="adapter_name", value=name)
            self.fence(ctx)
            key = adapter_key(name, ctx.job_id, ctx.attempt)
            uri = self.store.publish_dir(key, out)
            digest = sha256_file(out / "adapter_model.safetensors")
            metrics = {k: float(v) for k, v in trained_metrics.items()}
            metrics["resumed_from_step"] = float(resumed)
            record = AdapterRecord(name=name, uri=uri, base_model=p["base_model"], lora=lora.to_dict(),
                                   metrics=metrics, create_time=time.time(), job_id=ctx.job_id, digest=digest)
            result = {"adapter_name": name, "adapter_uri": uri, "metrics": metrics,
                      "loss_curve_uri": self.store.uri(f"{key}/{LOSS_CURVE_FILE}")}
            try:
                ctx.report(0.99, f"published adapter {name}", {"step": step})
                # The result and the registry entry land in one transaction, or not at all.
                ctx.succeed(result, commit=lambda pipe: self.registry.put_adapter(record, pipe=pipe),
                            message=f"adapter {name} registered")
            except BaseException:
                # Cancelled or fenced at the last moment: the bytes must not outlive the attempt.
                self.store.delete(key)
                raise
            self.store.delete(checkpoint_prefix(ctx.job_id))
            if self.metrics is not None:
                self.metrics.observe_job("succeeded")
            return result
        finally:
            shutil.rmtree(out, ignore_errors=True)


def ctx_progress(ctx: JobContext) -> float:
    """The job's current progress (events keep it; a checkpoint event must not move it backwards)."""
    raw = ctx.queue.redis.hget(ctx.queue.job_key(ctx.job_id), "progress")
    return float(raw) if raw else 0.0
