"""LoRA fine-tuning: settings, PEFT wiring, a plain resumable training loop, and the adapter output.

The loop is deliberately small (no HF Trainer): AdamW, warmup + cosine/linear/constant schedule,
gradient accumulation, optional gradient checkpointing, dynamic padding, a stop flag checked at every
optimiser step, and checkpoints holding everything a resumed run needs to continue bit-for-bit
(adapter weights, optimiser, scheduler, RNG state, data position, loss history).

The LM head is applied only at the positions the loss reads (see ``selected_token_loss``): prompts
and padding never get a [*, vocab] logit row, which is most of the activation memory for
completion-only training with a large vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from loraflow.artifact.graph_contract import ALL_LORA_MODULES
from loraflow.errors import FailedPrecondition, InvalidArgument
from services.trainer.dataset import IGNORE_INDEX, DatasetSplits, Example
from services.trainer.loss_plot import plot_loss_curve

ALL_LINEAR = "all-linear"
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
BIASES = ("none", "all", "lora_only")
SCHEDULERS = ("cosine", "linear", "constant")
MAX_RANK = 1024
MAX_TARGET_MODULES = 64
MAX_MODULE_NAME_LEN = 128
MAX_WORLD_SIZE = 64
MAX_NODES = 16

CHECKPOINT_STATE = "trainer_state.json"
log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOSS_CURVE_FILE = "loss_curve.png"


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# --- settings ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraSettings:
    """peft.LoraConfig's knobs, validated. ``target_modules`` is a tuple or ("all-linear",)."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or not 0 < self.r <= MAX_RANK:
            raise InvalidArgument(f"lora.r must be in 1..{MAX_RANK}, got {self.r!r}", field="lora.r", value=self.r)
        if not _finite(self.lora_alpha) or self.lora_alpha <= 0:
            raise InvalidArgument(f"lora.lora_alpha must be a finite number > 0, got {self.lora_alpha!r}",
                                  field="lora.lora_alpha", value=self.lora_alpha)
        if not _finite(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            raise InvalidArgument(f"lora.lora_dropout must be in [0, 1), got {self.lora_dropout!r}",
                                  field="lora.lora_dropout", value=self.lora_dropout)
        if self.bias not in BIASES:
            raise InvalidArgument(f"lora.bias must be one of {list(BIASES)}, got {self.bias!r}",
                                  field="lora.bias", value=self.bias)
        if self.bias != "none":
            # PEFT's trained biases change the base weights; the compiler's adapter banks cannot hold them.
            raise InvalidArgument(f"lora.bias {self.bias!r} cannot be served (the compiler accepts only 'none')",
                                  field="lora.bias", value=self.bias)
        targets = self.target_modules
        if not targets:
            raise InvalidArgument("lora.target_modules must not be empty", field="lora.target_modules", value=[])
        if len(targets) > MAX_TARGET_MODULES:
            raise InvalidArgument(f"lora.target_modules has {len(targets)} entries, at most {MAX_TARGET_MODULES}",
                                  field="lora.target_modules", value=len(targets))
        for i, name in enumerate(targets):
            if not isinstance(name, str) or not name or len(name) > MAX_MODULE_NAME_LEN \
                    or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
                raise InvalidArgument(f"lora.target_modules[{i}] is not a module name: {name!r}",
                                      field=f"lora.target_modules[{i}]", value=name)
        for i, name in enumerate(targets):
            # Only what the compiler's adapter banks can serve: a trained lm_head or embedding would be
            # rejected at compile time, after the whole training run.
            if name != ALL_LINEAR and name not in ALL_LORA_MODULES:
                raise InvalidArgument(
                    f"lora.target_modules[{i}] = {name!r} cannot be served; accepted: "
                    f"{list(ALL_LORA_MODULES)} or {ALL_LINEAR!r}", field=f"lora.target_modules[{i}]",
                    value=name, metadata={"accepted": ",".join((*ALL_LORA_MODULES, ALL_LINEAR))})
        if ALL_LINEAR in targets and len(targets) > 1:
            raise InvalidArgument(f"lora.target_modules: {ALL_LINEAR!r} must be the only entry, got {list(targets)}",
                                  field="lora.target_modules", value=list(targets))
        if len(set(targets)) != len(targets):
            raise InvalidArgument(f"lora.target_modules has duplicates: {list(targets)}",
                                  field="lora.target_modules", value=list(targets))

    @property
    def all_linear(self) -> bool:
        return self.target_modules == (ALL_LINEAR,)

    def check_targets(self, linear_modules: Sequence[str]) -> None:
        """Raise InvalidArgument when a target is not one of the model's linear module names."""
        if self.all_linear:
            self.resolved_targets(linear_modules)
            return
        known = set(linear_modules)
        for i, name in enumerate(self.target_modules):
            if name not in known:
                raise InvalidArgument(
                    f"lora.target_modules[{i}] = {name!r} is not a linear module of this model; "
                    f"its linear modules are {sorted(linear_modules)} (or {ALL_LINEAR!r})",
                    field=f"lora.target_modules[{i}]", value=name,
                    metadata={"linear_modules": ",".join(sorted(linear_modules))})

    def resolved_targets(self, linear_modules: Sequence[str]) -> tuple[str, ...]:
        """The explicit short module names to adapt: ``all-linear`` becomes the model's servable linears.

        PEFT would expand ``all-linear`` itself, but writes full module paths into adapter_config.json
        and may pick linears the compiler cannot serve; explicit names keep the saved config servable.
        """
        if not self.all_linear:
            return self.target_modules
        # Every family has either the separate projections or the packed ones (Phi-3's qkv_proj, gate_up_proj).
        resolved = tuple(m for m in ALL_LORA_MODULES if m in set(linear_modules))
        if not resolved:
            raise InvalidArgument(f"lora.target_modules: {ALL_LINEAR!r} matches none of {list(ALL_LORA_MODULES)} "
                                  f"in this model (its linear modules are {sorted(linear_modules)})",
                                  field="lora.target_modules", value=ALL_LINEAR)
        return resolved

    def to_peft(self, linear_modules: Sequence[str] | None = None):
        """The peft.LoraConfig for a causal LM (as QEfficient's apply_peft builds it); ``linear_modules``
        (the model's) resolves ``all-linear``."""
        from peft import LoraConfig, TaskType

        if self.all_linear and linear_modules is None:
            raise FailedPrecondition("lora.target_modules 'all-linear' needs the model's linear modules to resolve",
                                     field="lora.target_modules", value=ALL_LINEAR)
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.lora_alpha,
            target_modules=list(self.resolved_targets(linear_modules or ())),
            lora_dropout=self.lora_dropout,
            bias=self.bias,
            use_rslora=self.use_rslora,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass(frozen=True)
class TrainingSettings:
    """The optimisation loop's knobs, validated; defaults match protos/loraflow/v1/trainer.proto."""

    max_steps: int = 0  # 0 = run num_epochs
    num_epochs: float = 1.0
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    max_seq_len: int = 512
    seed: int = 0
    eval_fraction: float = 0.0
    checkpoint_every_steps: int = 50
    device: str = "cpu"
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    gradient_checkpointing: bool = False
    weight_decay: float = 0.0
    eval_every_steps: int = 0  # 0 = at checkpoints and at the end
    world_size: int = 1  # data-parallel ranks; the global batch (batch_size x accumulation) does not change
    nodes: int = 1  # machines the ranks span (world_size / nodes ranks on each)

    def __post_init__(self) -> None:
        def int_in(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise InvalidArgument(f"training.{name} must be an integer in {lo}..{hi}, got {v!r}",
                                      field=f"training.{name}", value=v)

        int_in("max_steps", 0, 10_000_000)
        int_in("batch_size", 1, 4096)
        int_in("gradient_accumulation_steps", 1, 4096)
        int_in("max_seq_len", 2, 1 << 20)
        int_in("seed", 0, 2**63 - 1)
        int_in("checkpoint_every_steps", 1, 10_000_000)
        int_in("warmup_steps", 0, 10_000_000)
        int_in("eval_every_steps", 0, 10_000_000)
        if not _finite(self.num_epochs) or not 0 < self.num_epochs <= 10_000:
            raise InvalidArgument(f"training.num_epochs must be in (0, 10000], got {self.num_epochs!r}",
                                  field="training.num_epochs", value=self.num_epochs)
        if not _finite(self.learning_rate) or not 0 < self.learning_rate <= 1:
            raise InvalidArgument(f"training.learning_rate must be in (0, 1], got {self.learning_rate!r}",
                                  field="training.learning_rate", value=self.learning_rate)
        if not _finite(self.eval_fraction) or not 0 <= self.eval_fraction <= 0.5:
            raise InvalidArgument(f"training.eval_fraction must be in [0, 0.5], got {self.eval_fraction!r}",
                                  field="training.eval_fraction", value=self.eval_fraction)
        if not _finite(self.weight_decay) or not 0 <= self.weight_decay <= 10:
            raise InvalidArgument(f"training.weight_decay must be in [0, 10], got {self.weight_decay!r}",
                                  field="training.weight_decay", value=self.weight_decay)
        if self.lr_scheduler not in SCHEDULERS:
            raise InvalidArgument(f"training.lr_scheduler must be one of {list(SCHEDULERS)}, got {self.lr_scheduler!r}",
                                  field="training.lr_scheduler", value=self.lr_scheduler)
        if not isinstance(self.device, str) or not (self.device in ("cpu", "cuda", "qaic")
                                                    or (self.device.startswith("cuda:")
                                                        and self.device[5:].isdigit())):
            raise InvalidArgument(f"training.device must be 'cpu', 'cuda', 'cuda:N' or 'qaic', got {self.device!r}",
                                  field="training.device", value=self.device)
        int_in("world_size", 1, MAX_WORLD_SIZE)
        if self.world_size > 1:
            if self.device not in ("cpu", "cuda"):
                # Each rank picks its own GPU (cuda:LOCAL_RANK); qaic has no collective backend here.
                raise InvalidArgument(f"training.world_size={self.world_size} needs device 'cpu' (gloo) or 'cuda' "
                                      f"(NCCL), got {self.device!r}", field="training.world_size",
                                      value=self.world_size)
            global_batch = self.batch_size * self.gradient_accumulation_steps
            if global_batch < self.world_size:
                raise InvalidArgument(
                    f"training.world_size={self.world_size} exceeds the global batch (batch_size x "
                    f"gradient_accumulation_steps = {global_batch}): some ranks would have no examples",
                    field="training.world_size", value=self.world_size)
        int_in("nodes", 1, MAX_NODES)
        if self.world_size % self.nodes:
            raise InvalidArgument(f"training.nodes={self.nodes} must divide training.world_size={self.world_size} "
                                  "(every machine runs the same number of ranks)", field="training.nodes",
                                  value=self.nodes)

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nodes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """The torch device for a validated device string; FailedPrecondition when it is not on this machine."""
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"training.device={device!r} but CUDA is not available on this worker",
                                     field="training.device", value=device)
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise FailedPrecondition(f"training.device={device!r} but this worker has "
                                     f"{torch.cuda.device_count()} CUDA device(s)", field="training.device", value=device)
        return torch.device(device)
    if importlib.util.find_spec("torch_qaic") is None:
        raise FailedPrecondition("training.device='qaic' needs the Qualcomm torch_qaic package, "
                                 "which is not installed on this worker", field="training.device", value=device)
    import torch_qaic  # noqa: F401  (registers the "qaic" device with torch)

    return torch.device("qaic")


# --- base model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class BaseModelInfo:
    """What the API process learns from config.json alone (no weights loaded)."""

    model_type: str
    linear_modules: tuple[str, ...]  # leaf names of nn.Linear modules, lm_head excluded


def inspect_base_model(config_json: dict[str, Any], *, field: str = "base_model") -> BaseModelInfo:
    """Check config.json describes a supported causal LM and list its linear modules.

    The model is built on the meta device, so this costs no memory and reads no weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config_json.get("model_type") if isinstance(config_json, dict) else None
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidArgument(f"base model config.json has model_type {model_type!r}, which is not a supported "
                              "causal LM", field=field, value=model_type)
    try:
        kwargs = {k: v for k, v in config_json.items() if k != "model_type"}
        config = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # a malformed config.json is the client's input, not our bug
        # The exception's text may quote config values (file bytes): the client gets its type, the log the rest.
        log.info("config.json of %s cannot build a %s model: %s", field, model_type, e)
        raise InvalidArgument(f"base model config.json cannot build a {model_type} model "
                              f"({type(e).__name__}; the trainer's log has the details)",
                              field=field, value=model_type) from None
    return BaseModelInfo(model_type=model_type, linear_modules=linear_module_names(model))


def linear_module_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Sorted leaf names of the nn.Linear modules LoRA can target (the output head excluded)."""
    names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}
    names.discard("lm_head")
    return tuple(sorted(names))


def read_config_json(model_dir: str | Path, *, field: str = "base_model") -> dict[str, Any]:
    from loraflow.security.safe_files import MAX_CONFIG_BYTES, confined_file, read_regular_file

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InvalidArgument(f"base model {str(model_dir)!r} has no config.json (not a Hugging Face checkpoint)",
                              field=field, value=str(model_dir))
    raw = read_regular_file(confined_file(model_dir, "config.json", field=field), field=field, limit=MAX_CONFIG_BYTES)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        # Only the position: a JSON error's text never quotes the file.
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidArgument(f"base model config.json is not valid JSON{where}", field=field,
                              value=str(model_dir)) from None


def load_base_model(model_dir: str | Path, device: torch.device, *, gradient_checkpointing: bool = False):
    """(model, tokenizer) from a local HF checkpoint, float32 on ``device``, ready for PEFT."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no requires_grad on the (frozen) inputs.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device), tokenizer


def apply_peft(model, lora: LoraSettings):
    """Wrap ``model`` with fresh LoRA adapters (QEfficient's apply_peft, minus the from-checkpoint branch)."""
    from peft import get_peft_model

    linear = linear_module_names(model)
    lora.check_targets(linear)
    return get_peft_model(model, lora.to_peft(linear))


# --- loss ---------------------------------------------------------------------------------------

def _apply_head(model, head_input: torch.Tensor) -> torch.Tensor:
    logits = model.get_output_embeddings()(head_input)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def selected_token_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy, number of loss tokens), with the LM head run only where labels exist.

    ``model`` is the causal LM (PEFT layers injected in place). Labels are shifted: position t's
    hidden state predicts token t+1.
    """
    body = model.get_decoder()
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    chosen = hidden[:, :-1][keep]  # [N, H]: only the positions the loss reads
    logits = _apply_head(model, chosen)  # [N, V]
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


def full_logits_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The textbook path (logits at every position), kept for the benchmark and equivalence tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [B, T, V]
    targets = labels[:, 1:]  # [B, T-1]
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, T]
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# --- the loop -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepProgress:
    """What a progress callback sees after an optimiser step."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    eval_loss: float | None = None


class TrainingCallback:
    """Hooks the worker implements; the defaults do nothing. Exceptions raised here abort training."""

    def on_step(self, progress: StepProgress) -> None:
        pass

    def on_checkpoint(self, step: int, directory: Path) -> None:
        pass


@dataclass
class TrainOutcome:
    completed: bool  # False when the stop flag ended the run early
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class LoraTrainer:
    """Trains a PEFT LoRA model on tokenized splits; resumable from its own checkpoints.

    ``stop`` is checked before every optimiser step; setting it ends ``train()`` at a step boundary
    (so a checkpoint taken afterwards is exact).
    """

    def __init__(self, model, tokenizer, splits: DatasetSplits, lora: LoraSettings, training: TrainingSettings,
                 *, work_dir: str | Path, callback: TrainingCallback | None = None,
                 stop: threading.Event | None = None, device: torch.device | None = None):
        if not splits.train:
            raise InvalidArgument("the training split is empty", field="dataset_uri", value=0)
        self.model = model
        self.tokenizer = tokenizer
        self.splits = splits
        self.lora = lora
        self.training = training
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.callback = callback or TrainingCallback()
        self.stop = stop or threading.Event()
        self.device = device or next(model.parameters()).device
        # The causal LM inside the PeftModel: LoRA layers are injected in place, so its body and head train.
        self.causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        t = training
        self.micro_per_epoch = math.ceil(len(splits.train) / t.batch_size)
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / t.gradient_accumulation_steps))
        self.total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * self.steps_per_epoch))

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.scheduler = _make_scheduler(self.optimizer, t, self.total_steps)

        self.step = 0
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.train_history: list[tuple[int, float]] = []
        self.eval_history: list[tuple[int, float]] = []
        self._orders: dict[int, list[int]] = {}

    # data order: epoch e is a permutation seeded by (seed, e), so any position is reproducible
    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.training.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.splits.train), generator=gen).tolist()}
        return self._orders[epoch]

    def _micro_batch(self, index: int) -> list[Example]:
        epoch, within = divmod(index, self.micro_per_epoch)
        order = self._order(epoch)
        bs = self.training.batch_size
        return [self.splits.train[i] for i in order[within * bs:(within + 1) * bs]]

    def _step_batches(self, step: int) -> list[list[Example]]:
        ga = self.training.gradient_accumulation_steps
        return [self._micro_batch(step * ga + k) for k in range(ga)]

    def evaluate(self) -> float | None:
        """Mean per-token loss on the eval split (None without one)."""
        if not self.splits.eval:
            return None
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad():
                bs = self.training.batch_size
                for i in range(0, len(self.splits.eval), bs):
                    batch = collate(self.splits.eval[i:i + bs], self.pad_id, self.device)
                    loss, n = selected_token_loss(self.causal_lm, **batch)
                    total += float(loss)
                    count += n
        finally:
            self.model.train(was_training)
        return total / max(count, 1)

    def _should_eval(self, step: int) -> bool:
        t = self.training
        if step == self.total_steps:
            return True
        if t.eval_every_steps:
            return step % t.eval_every_steps == 0
        return step % t.checkpoint_every_steps == 0

    def train(self) -> TrainOutcome:
        """Run from ``self.step`` to ``total_steps`` (or until ``stop`` is set)."""
        t = self.training
        self.model.train()
        if self.step == 0 and self.splits.eval and not self.eval_history:
            self.eval_history.append((0, self.evaluate()))
        first_step = self.step
        start = time.monotonic()
        while self.step < self.total_steps:
            if self._should_stop():
                return TrainOutcome(completed=False, step=self.step, metrics=self.metrics())
            t0 = time.monotonic()
            loss, seen = self._forward_backward(self._step_batches(self.step))
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1

            self.tokens_seen += seen
            elapsed = time.monotonic() - t0
            self.train_seconds += elapsed
            self.train_history.append((self.step, loss))
            eval_loss = self.evaluate() if self.splits.eval and self._should_eval(self.step) else None
            if eval_loss is not None:
                self.eval_history.append((self.step, eval_loss))
            per_step = (time.monotonic() - start) / (self.step - first_step)
            self.callback.on_step(StepProgress(
                step=self.step, total_steps=self.total_steps, epoch=self.step / self.steps_per_epoch, loss=loss,
                learning_rate=lr, tokens_per_second=seen / max(elapsed, 1e-9),
                eta_seconds=per_step * (self.total_steps - self.step), eval_loss=eval_loss))
            if self.step % t.checkpoint_every_steps == 0 and self.step < self.total_steps:
                self._checkpoint_due()
        return TrainOutcome(completed=True, step=self.step, metrics=self.metrics())

    def _forward_backward(self, step_batches: list[list[Example]]) -> tuple[float, int]:
        """Accumulate one optimiser step's gradients; returns (mean loss per loss token, tokens seen)."""
        batches = [collate(b, self.pad_id, self.device) for b in step_batches]
        # Normalise by the step's total loss tokens so accumulation equals one big batch.
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        step_loss = 0.0
        for b in batches:
            loss_sum, _ = selected_token_loss(self.causal_lm, **b)
            (loss_sum / max(n_tokens, 1)).backward()
            step_loss += loss_sum.item()
        seen = sum(int(b["attention_mask"].sum()) for b in batches)
        return step_loss / max(n_tokens, 1), seen

    def _checkpoint_due(self) -> None:
        self.callback.on_checkpoint(self.step, self.save_checkpoint())

    def _should_stop(self) -> bool:
        return self.stop.is_set()

    def metrics(self) -> dict[str, float]:
        m = {"steps": float(self.step), "total_steps": float(self.total_steps), "tokens": float(self.tokens_seen),
             "train_seconds": self.train_seconds, "train_examples": float(len(self.splits.train)),
             "eval_examples": float(len(self.splits.eval))}
        if self.train_history:
            m["train_loss"] = self.train_history[-1][1]
            m["first_train_loss"] = self.train_history[0][1]
        if self.eval_history:
            m["eval_loss"] = self.eval_history[-1][1]
            m["initial_eval_loss"] = self.eval_history[0][1]
        if self.train_seconds > 0:
            m["tokens_per_second"] = self.tokens_seen / self.train_seconds
        return m

    # --- checkpoints ---------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        training = self.training.to_dict()
        if training["world_size"] == 1:
            del training["world_size"]  # as checkpoints written before world_size existed say it
        # The machines do not change the model (the same world_size trains the same steps), but a resumed
        # attempt keeps its layout so its ranks shard the batch as before.
        if training["nodes"] == 1:
            del training["nodes"]
        return {"lora": self.lora.to_dict(), "training": training,
                "train_examples": len(self.splits.train), "eval_examples": len(self.splits.eval)}

    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Write a resumable checkpoint (default: ``work_dir/checkpoints/step-N``); returns its directory."""
        directory = Path(directory or self.work_dir / "checkpoints" / f"step-{self.step:08d}")
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / "adapter")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, directory / "rng.pt")
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                 "python_random": _jsonable_random_state(), "train_history": self.train_history,
                 "eval_history": self.eval_history, "fingerprint": self._fingerprint()}
        (directory / CHECKPOINT_STATE).write_text(json.dumps(state))
        return directory

    def resume_from(self, directory: str | Path) -> int:
        """Load a checkpoint written by ``save_checkpoint``; training continues at its step. Returns the step."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        state = json.loads((directory / CHECKPOINT_STATE).read_text())
        if state["fingerprint"] != self._fingerprint():
            raise FailedPrecondition(f"checkpoint {directory.name} was written with different settings or data; "
                                     "cannot resume from it", field="checkpoint", value=str(directory))
        weights = load_file(directory / "adapter" / "adapter_model.safetensors", device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        if getattr(result, "unexpected_keys", None):
            raise FailedPrecondition(f"checkpoint adapter has unexpected tensors {result.unexpected_keys[:5]}",
                                     field="checkpoint", value=str(directory))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", map_location=self.device))
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt"))
        rng = torch.load(directory / "rng.pt")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_restore_random_state(state["python_random"]))
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.train_seconds = float(state["train_seconds"])
        self.train_history = [tuple(x) for x in state["train_history"]]
        self.eval_history = [tuple(x) for x in state["eval_history"]]
        return self.step

    # --- output --------------------------------------------------------------------------------

    def save_adapter(self, out_dir: str | Path, *, extra_metrics: dict[str, float] | None = None,
                     base_model: str = "") -> Path:
        """Plain PEFT dir (adapter_config.json + adapter_model.safetensors) + metrics.json + loss_curve.png.

        `base_model` is the model as the job named it (PEFT records only the local path it was loaded from);
        metrics.json keeps it so `loraflow registry rebuild` can restore the adapter's record from the store."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir)
        # The one validated adapter loader the compiler and inference use: what is published can be served.
        from loraflow.artifact.lora_bank import read_adapter

        read_adapter(out_dir.name, out_dir)
        metrics = {**self.metrics(), **(extra_metrics or {})}
        (out_dir / METRICS_FILE).write_text(json.dumps(
            {"base_model": base_model, "metrics": metrics, "train_history": self.train_history, "eval_history": self.eval_history,
             "lora": self.lora.to_dict(), "training": self.training.to_dict()}, indent=2))
        plot_loss_curve(self.train_history, self.eval_history, out_dir / LOSS_CURVE_FILE,
                        title=f"LoRA r={self.lora.r}, {self.step} steps")
        return out_dir


def _make_scheduler(optimizer, t: TrainingSettings, total_steps: int):
    from transformers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if t.lr_scheduler == "constant":
        return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    if t.lr_scheduler == "linear":
        return get_linear_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)
    return get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, total_steps)


def _jsonable_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_random_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def set_seed(seed: int) -> None:
    """Seed every RNG the loop uses (LoRA init, dropout, Python)."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def build_trainer(model_dir: str | Path, splits_fn, lora: LoraSettings, training: TrainingSettings, *,
                  work_dir: str | Path, callback: TrainingCallback | None = None,
                  stop: threading.Event | None = None) -> LoraTrainer:
    """Load the base model, tokenize (``splits_fn(tokenizer) -> DatasetSplits``), apply LoRA, build the loop."""
    device = resolve_device(training.device)
    set_seed(training.seed)
    model, tokenizer = load_base_model(model_dir, device, gradient_checkpointing=training.gradient_checkpointing)
    splits = splits_fn(tokenizer)
    peft_model = apply_peft(model, lora)
    return LoraTrainer(peft_model, tokenizer, splits, lora, training, work_dir=work_dir, callback=callback,
                       stop=stop, device=device)
