"""One rank of a distributed training attempt: ``torchrun ... -m services.trainer.rank_main RUN_DIR/spec.json``.

Every rank loads the same base model and dataset, joins the gloo (CPU) or NCCL (CUDA) process group
and trains its share of each global batch (services.trainer.distributed). Rank 0 alone reports steps,
writes checkpoints and the final adapter into the run directory and tells the worker through
events.jsonl (services.trainer.rank_group); the worker publishes them, fenced by its attempt.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.trainer.rank_group import PIDS_DIR, SPEC_FILE, STOP_FILE, EventWriter, process_running

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankSpec:
    """What every rank needs, written by the worker as spec.json in the run directory."""

    model_dir: str
    dataset_file: str
    base_model: str  # as the job named it, for metrics.json
    lora: dict[str, Any]
    training: dict[str, Any]
    resume_dir: str | None
    resumed_step: int
    out_dir: str
    worker_pid: int

    def write(self, run_dir: Path) -> Path:
        path = Path(run_dir) / SPEC_FILE
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> RankSpec:
        return cls(**json.loads(Path(path).read_text()))


def _die_with_parent() -> None:
    """Linux: this rank gets SIGKILL when its torchrun agent dies, so no rank outlives its attempt."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether the worker still runs (a killed, unreaped worker is a zombie: dead)."""
    if Path("/proc/self").exists():
        return process_running(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(spec_path: str) -> int:
    import torch
    import torch.distributed as dist

    from loraflow.errors import LoraflowError
    from services.trainer.dataset import build_splits, parse_jsonl
    from services.trainer.distributed import DistributedLoraTrainer
    from services.trainer.training import (
        LoraSettings,
        StepProgress,
        TrainingCallback,
        TrainingSettings,
        apply_peft,
        load_base_model,
        set_seed,
    )

    _die_with_parent()
    spec = RankSpec.read(Path(spec_path))
    run_dir = Path(spec_path).parent
    lora, training = LoraSettings(**spec.lora), TrainingSettings(**spec.training)
    cuda = training.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, local_rank = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    (run_dir / PIDS_DIR / f"rank-{rank}").write_text(str(os.getpid()))
    events = EventWriter(run_dir) if rank == 0 else None
    stop_file = run_dir / STOP_FILE

    class RankZeroCallback(TrainingCallback):
        last_checkpoint_step = spec.resumed_step

        def on_step(self, progress: StepProgress) -> None:
            events.write("step", progress=asdict(progress))

        def on_checkpoint(self, step: int, directory: Path) -> None:
            events.write("checkpoint", step=step, dir=str(directory))
            self.last_checkpoint_step = step

    class PeerCallback(TrainingCallback):
        def on_step(self, progress: StepProgress) -> None:
            # Another machine's rank has no rank 0 beside it to notice its worker died: it leaves itself.
            if not _alive(spec.worker_pid):
                os._exit(3)

    callback = RankZeroCallback() if rank == 0 else PeerCallback()
    try:
        device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        set_seed(training.seed)
        model, tokenizer = load_base_model(spec.model_dir, device,
                                           gradient_checkpointing=training.gradient_checkpointing)
        records = parse_jsonl(Path(spec.dataset_file).read_bytes(), field="dataset_uri")
        splits = build_splits(tokenizer, records, max_seq_len=training.max_seq_len,
                              eval_fraction=training.eval_fraction, seed=training.seed)
        trainer = DistributedLoraTrainer(
            apply_peft(model, lora), tokenizer, splits, lora, training, work_dir=run_dir / f"rank-{rank}",
            callback=callback, device=device,
            stop_requested=lambda: stop_file.exists() or not _alive(spec.worker_pid))
        if spec.resume_dir:
            trainer.resume_from(spec.resume_dir)
        # Every rank's pid, whichever machine it runs on (each also wrote it under its own run dir's pids/).
        all_pids: list[int] = [0] * dist.get_world_size()
        dist.all_gather_object(all_pids, os.getpid())
        if rank == 0:
            pids = {f"rank_{r}_pid": float(pid) for r, pid in enumerate(all_pids)}
            tensors, elements = trainer.synced_parameters()
            trainable = [p for p in trainer.model.parameters() if p.requires_grad]
            events.write("started", total_steps=trainer.total_steps, train_examples=len(splits.train),
                         eval_examples=len(splits.eval), step=trainer.step, metrics={
                             **pids, "world_size": float(dist.get_world_size()),
                             "ddp_synced_tensors": float(tensors), "ddp_synced_elements": float(elements),
                             "trainable_tensors": float(len(trainable)),
                             "trainable_elements": float(sum(p.numel() for p in trainable)),
                             "frozen_elements": float(sum(p.numel() for p in trainer.model.parameters()
                                                          if not p.requires_grad))})
        outcome = trainer.train()
        if rank == 0:
            if not outcome.completed:
                if not _alive(spec.worker_pid):
                    os._exit(3)  # nobody would publish it: stop at once
                if trainer.step > callback.last_checkpoint_step:
                    events.write("checkpoint", step=trainer.step, dir=str(trainer.save_checkpoint()))
                events.write("stopped", step=trainer.step)
            else:
                out = trainer.save_adapter(spec.out_dir, extra_metrics={"resumed_from_step": float(spec.resumed_step)},
                                           base_model=spec.base_model)
                events.write("done", step=trainer.step, dir=str(out), metrics=trainer.metrics())
        dist.barrier()
    except LoraflowError as exc:
        # Our own validation errors (never file bytes): the worker fails the job with the same error.
        if events is not None:
            events.write("error", type=type(exc).__name__, message=exc.message, field=exc.field,
                         value=None if exc.value is None else str(exc.value))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
