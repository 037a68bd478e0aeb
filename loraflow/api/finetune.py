"""`loraflow.finetune` and `loraflow.apply_peft`: QEfficient-style fine-tuning with PEFT's LoraConfig.

In-process, `finetune` runs the trainer's own loop (services.trainer.training: the same settings
validation, loss masking, schedule and adapter output as the trainer service) with a progress bar,
and writes a PEFT adapter directory with metrics.json and loss_curve.png. Connected (the model was
loaded with connect=, or connect= is given here, or $LORAFLOW_TRAINER is set), it submits a training
job to the trainer service and follows it. `apply_peft` returns the PEFT model the trainer would
train, for a user's own loop.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loraflow.api import sources
from loraflow.api.lora_config import lora_settings
from loraflow.options.names import validate_name

# QEfficient train_config names → TrainingSettings fields.
TRAIN_ALIASES = {"lr": "learning_rate", "batch_size_training": "batch_size", "max_train_step": "max_steps",
                 "context_length": "max_seq_len", "gradient_accumulation": "gradient_accumulation_steps"}


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run produced; usable as a path (os.PathLike) for load_adapter."""

    adapter_name: str
    adapter_path: Path | None  # local PEFT directory (in-process)
    adapter_uri: str  # store URI (connected) or the directory's file:// URI
    loss_curve: str
    metrics: dict[str, float] = field(default_factory=dict)

    def __fspath__(self) -> str:
        if self.adapter_path is None:
            raise TypeError(f"adapter {self.adapter_name!r} lives in the services' store ({self.adapter_uri}); "
                            "load it by name")
        return str(self.adapter_path)


def training_settings(train_config: dict[str, Any]):
    from services.trainer.training import TrainingSettings

    known = {f.name for f in fields(TrainingSettings)}
    values = {}
    for key, value in train_config.items():
        name = TRAIN_ALIASES.get(key, key)
        if name not in known:
            raise TypeError(f"finetune() got unexpected keyword argument {key!r}; training options: {sorted(known)} "
                            f"(QEfficient names {sorted(TRAIN_ALIASES)} are accepted too)")
        values[name] = value
    return TrainingSettings(**values)


def _records(dataset: Any):
    from services.trainer.dataset import parse_jsonl, read_jsonl

    if isinstance(dataset, str | os.PathLike):
        return read_jsonl(Path(dataset).expanduser(), field="dataset")
    if isinstance(dataset, Iterable):
        rows = list(dataset)
        return parse_jsonl("".join(json.dumps(r) + "\n" for r in rows), field="dataset")
    raise TypeError(f"dataset must be a JSONL path or a list of records, got {type(dataset).__name__}")


def _base(model: Any, cache_dir: Path | None) -> tuple[Path | None, str, Any]:
    """(local checkpoint dir, spec, client) of what `model` names."""
    from loraflow.api.auto_model import AutoLoraModelForCausalLM

    if isinstance(model, AutoLoraModelForCausalLM):
        return model.base_dir, model.model_name, model.client
    spec = sources.spec_string(model, "model")
    return sources.resolve_model(spec, cache_dir=cache_dir), spec, None


class _ProgressBar:
    """A rich progress bar fed by the trainer's callback (or by job events)."""

    def __init__(self, enabled: bool, name: str):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn(f"  {name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), disable=not enabled)
        self.task = self.progress.add_task(name, total=1, status="starting")

    def update(self, step: int, total: int, loss: float | None) -> None:
        status = f"loss {loss:.4f}" if loss is not None else ""
        self.progress.update(self.task, completed=step, total=total, status=status)

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def finetune(model: Any, dataset: Any, lora_config: Any = None, *, adapter_name: str = "adapter",
             output_dir: str | os.PathLike | None = None, connect: Any = None, progress: bool = True,
             cache_dir: str | os.PathLike | None = None, **train_config) -> FinetuneResult:
    """Train a LoRA adapter on `dataset` (JSONL path or list of {"prompt","completion"} / {"messages"} / {"text"}).

    `train_config`: TrainingSettings fields (max_steps, num_epochs, batch_size, learning_rate, max_seq_len,
    seed, warmup_steps, lr_scheduler, eval_fraction, device, ...)."""
    from loraflow.api.connection import make_client

    validate_name("adapter_name", adapter_name)
    lora = lora_settings(lora_config)
    training = training_settings(train_config)
    base_dir, spec, client = _base(model, Path(cache_dir) if cache_dir else None)
    client = make_client(connect, services=("trainer",)) if connect is not None or client is None else client
    if client is not None:
        return _finetune_remote(client, base_dir, spec, dataset, lora, training, adapter_name, progress)
    return _finetune_here(base_dir, spec, dataset, lora, training, adapter_name, output_dir, progress, cache_dir)


def _finetune_here(base_dir: Path, spec: str, dataset: Any, lora, training, name: str, output_dir, progress: bool,
                   cache_dir) -> FinetuneResult:
    from loraflow.options.config import Settings
    from services.trainer.dataset import build_splits
    from services.trainer.training import LOSS_CURVE_FILE, TrainingCallback, build_trainer

    records = _records(dataset)
    cache = Path(cache_dir) if cache_dir else Path(Settings.from_env().cache_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    out = Path(output_dir) if output_dir else cache / "finetuned" / f"{name}-{stamp}"
    bar = _ProgressBar(progress, name)

    class Callback(TrainingCallback):
        def on_step(self, p) -> None:
            bar.update(p.step, p.total_steps, p.loss)

    with tempfile.TemporaryDirectory(prefix="loraflow-finetune-") as work, bar:
        trainer = build_trainer(base_dir, lambda tok: build_splits(tok, records, max_seq_len=training.max_seq_len,
                                                                   eval_fraction=training.eval_fraction,
                                                                   seed=training.seed),
                                lora, training, work_dir=work, callback=Callback())
        trainer.train()
        trainer.save_adapter(out, base_model=spec)
    sources.remember_trained(name, out)
    return FinetuneResult(adapter_name=name, adapter_path=out, adapter_uri=out.resolve().as_uri(),
                          loss_curve=str(out / LOSS_CURVE_FILE), metrics=dict(trainer.metrics()))


def _finetune_remote(client, base_dir: Path | None, spec: str, dataset: Any, lora, training, name: str,
                     progress: bool) -> FinetuneResult:
    from loraflow.api.remote_backend import service_spec

    if not isinstance(dataset, str | os.PathLike):
        raise TypeError("connected finetune() takes the dataset as a JSONL path the trainer service may read")
    _records(dataset)  # a bad line fails here, before a job is queued
    job = client.train(service_spec(spec, base_dir), str(Path(dataset).expanduser().resolve()), name, r=lora.r,
                       alpha=lora.lora_alpha, targets=lora.target_modules, dropout=lora.lora_dropout,
                       rslora=lora.use_rslora, bias=lora.bias, steps=training.max_steps,
                       epochs=training.num_epochs, batch_size=training.batch_size,
                       grad_accum=training.gradient_accumulation_steps, lr=training.learning_rate,
                       max_seq_len=training.max_seq_len, eval_fraction=training.eval_fraction, seed=training.seed,
                       checkpoint_every=training.checkpoint_every_steps, device=training.device,
                       warmup_steps=training.warmup_steps, lr_scheduler=training.lr_scheduler,
                       gradient_checkpointing=training.gradient_checkpointing)
    with _ProgressBar(progress, name) as bar:
        def on_event(event) -> None:
            step, total, loss = (event.metrics.get(k) for k in ("step", "total_steps", "loss"))
            if step is not None and total:
                bar.update(int(step), int(total), loss)

        done = client.wait(job.id, "train", on_event=on_event)
    result = done.train_result
    return FinetuneResult(adapter_name=result.adapter_name, adapter_path=None, adapter_uri=result.adapter_uri,
                          loss_curve=result.loss_curve_uri, metrics=dict(result.metrics))


def apply_peft(model: Any, lora_config: Any = None):
    """The PEFT model the trainer would train: `model` (a transformers model, or an AutoLoraModelForCausalLM /
    checkpoint path, loaded as the trainer loads it) wrapped with fresh LoRA layers for `lora_config`."""
    import torch

    from loraflow.api.auto_model import AutoLoraModelForCausalLM
    from services.trainer.training import apply_peft as trainer_apply_peft
    from services.trainer.training import load_base_model

    lora = lora_settings(lora_config)
    if isinstance(model, AutoLoraModelForCausalLM | str | os.PathLike):
        base_dir, _, _ = _base(model, None)
        model, _ = load_base_model(base_dir, torch.device("cpu"))
    return trainer_apply_peft(model, lora)
