"""CompileOptions: the static shapes and target of an artifact (mirrors loraflow.v1.CompileOptions).

``None`` means "use the default". The proto's "0 = default" convention is applied once, at the
gRPC boundary, by ``from_proto_values`` (0 / "" → None); in Python an explicit 0 is a mistake and
``validate()`` rejects it, naming ``options.<field>`` and the value. ``resolve()`` fills the
defaults, some of which depend on the adapter set (max_rank, adapter_slots, target_modules).
Only resolved options go into an artifact id, so equal requests hash equally.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from loraflow.artifact.graph_contract import ALL_LORA_MODULES, LORA_TARGET_MODULES
from loraflow.errors import InvalidArgument

TARGETS = ("onnxruntime", "ai100")
DTYPES = ("fp32", "fp16", "int8", "int4")
# dtypes whose base weights are MatMulNBits blocks (quant_block_size / quant_accuracy_level apply).
QUANTIZED_DTYPES = ("int8", "int4")
AI100_STAGES = ("compile", "export")
# An ai100 bundle's weight dtype: fp32 (qaic-exec converts it), or fp16, half the bytes to write and verify.
AI100_DTYPES = ("fp32", "fp16")
DEFAULT_QUANT_BLOCK_SIZE = 32
DEFAULT_QUANT_ACCURACY_LEVEL = 4  # int8 activations: the only fast CPU kernels (see the proto comment)
MAX_COMPILER_OPTIONS = 64
MAX_COMPILER_OPTION_LEN = 256

DEFAULT_PREFILL_SEQ_LEN = 32
DEFAULT_CTX_LEN = 512
DEFAULT_NUM_CORES = 16
MIN_DEFAULT_RANK = 8
EXTRA_SLOTS = 2

# Upper bounds: beyond these a request is a typo, not a model.
MAX_BATCH = 1024
MAX_CTX_LEN = 131072
MAX_RANK = 512
MAX_SLOTS = 1024
MAX_CORES = 64


@dataclass(frozen=True)
class CompileOptions:
    target: str = "onnxruntime"
    batch_size: int | None = None  # rows per prefill call (default 1)
    full_batch_size: int | None = None  # KV-cache slots decoded together (default batch_size)
    prefill_seq_len: int | None = None  # tokens per prefill chunk (default 32)
    ctx_len: int | None = None  # prompt + generated tokens (default 512)
    max_rank: int | None = None  # default: largest adapter rank, at least 8
    adapter_slots: int | None = None  # default: adapters + 2
    dtype: str = "fp32"
    num_cores: int | None = None  # ai100 only (default 16)
    target_modules: tuple[str, ...] = ()  # default: union of the adapters' targets (all 7 if none)
    mxfp6_matmul: bool = False
    quant_block_size: int | None = None  # int4/int8 only (default 32)
    quant_accuracy_level: int | None = None  # int4/int8 only, 0..4 (default 0)
    ai100_stage: str | None = None  # ai100 only: "compile" (default) or "export"
    compiler_options: tuple[str, ...] = ()  # ai100 only: extra qaic-exec options, "-name[=value]"

    def __post_init__(self):
        # Accept lists from JSON/protos but keep the dataclass hashable and frozen.
        for name in ("target_modules", "compiler_options"):
            if not isinstance(getattr(self, name), tuple):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @classmethod
    def from_proto_values(cls, **values: Any) -> CompileOptions:
        """Build from proto-style values where 0 / "" / [] mean "default"."""
        kept = {}
        for k, v in values.items():
            unset = v is None or (not isinstance(v, bool) and (v == 0 or v == "" or v == [] or v == ()))
            if not unset:
                kept[k] = v
        return cls(**kept)

    # --- defaults -------------------------------------------------------------------------
    def resolve(self, adapter_ranks: Iterable[int] = (), adapter_targets: Iterable[Iterable[str]] = (),
                default_modules: tuple[str, ...] = LORA_TARGET_MODULES) -> CompileOptions:
        """Fill every unset field with its default; the adapter set decides rank, slots and targets.

        With no adapters and no target_modules, every block linear (``default_modules``: the family's, the
        seven separate projections unless given) is adapted, so any adapter can be hot-added later.
        """
        ranks = list(adapter_ranks)
        targets_per_adapter = [tuple(t) for t in adapter_targets]
        target = self.target or "onnxruntime"
        batch = _default(self.batch_size, 1)
        full_batch = _default(self.full_batch_size, batch)
        union = {m for ts in targets_per_adapter for m in ts}
        modules = self.target_modules or tuple(m for m in ALL_LORA_MODULES if m in union) or default_modules
        # Canonical order so that equal sets give equal ids.
        modules = tuple(m for m in ALL_LORA_MODULES if m in modules) + tuple(
            m for m in modules if m not in ALL_LORA_MODULES)
        return replace(
            self,
            target=target,
            batch_size=batch,
            full_batch_size=full_batch,
            prefill_seq_len=_default(self.prefill_seq_len, DEFAULT_PREFILL_SEQ_LEN),
            ctx_len=_default(self.ctx_len, DEFAULT_CTX_LEN),
            max_rank=_default(self.max_rank, max([MIN_DEFAULT_RANK, *ranks])),
            adapter_slots=_default(self.adapter_slots, max(len(targets_per_adapter), len(ranks)) + EXTRA_SLOTS),
            dtype=self.dtype or "fp32",
            num_cores=_default(self.num_cores, DEFAULT_NUM_CORES) if target == "ai100" else None,
            target_modules=modules,
            quant_block_size=(_default(self.quant_block_size, DEFAULT_QUANT_BLOCK_SIZE)
                              if (self.dtype or "fp32") in QUANTIZED_DTYPES else None),
            quant_accuracy_level=(_default(self.quant_accuracy_level, DEFAULT_QUANT_ACCURACY_LEVEL)
                                  if (self.dtype or "fp32") in QUANTIZED_DTYPES else None),
            ai100_stage=(self.ai100_stage or "compile") if target == "ai100" else None,
        )

    # --- checks ---------------------------------------------------------------------------
    def validate(self, num_adapters: int | None = None) -> CompileOptions:
        """Raise InvalidArgument for the first bad field; returns self for chaining.

        ``num_adapters`` (when known) checks adapter_slots against the adapter set.
        """
        if self.target not in TARGETS:
            _bad("target", self.target, f"must be one of {list(TARGETS)}")
        if self.dtype not in DTYPES:
            _bad("dtype", self.dtype, f"must be one of {list(DTYPES)}")
        for name, upper in (("batch_size", MAX_BATCH), ("full_batch_size", MAX_BATCH),
                            ("prefill_seq_len", MAX_CTX_LEN), ("ctx_len", MAX_CTX_LEN),
                            ("max_rank", MAX_RANK), ("adapter_slots", MAX_SLOTS), ("num_cores", MAX_CORES),
                            ("quant_block_size", 256)):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                _bad(name, value, "must be an integer")
            if value <= 0:
                _bad(name, value, "must be > 0 (leave it unset for the default)")
            if value > upper:
                _bad(name, value, f"must be at most {upper}")
        resolved = self.resolve(adapter_ranks=(), adapter_targets=[()] * (num_adapters or 0))
        if resolved.ctx_len < resolved.prefill_seq_len:
            _bad("ctx_len", self.ctx_len,
                 f"must be >= prefill_seq_len ({resolved.prefill_seq_len}), got {resolved.ctx_len}")
        if resolved.full_batch_size < resolved.batch_size:
            _bad("full_batch_size", self.full_batch_size,
                 f"must be >= batch_size ({resolved.batch_size}), got {resolved.full_batch_size}")
        if num_adapters is not None and self.adapter_slots is not None and self.adapter_slots < num_adapters:
            _bad("adapter_slots", self.adapter_slots,
                 f"must be >= the number of adapters ({num_adapters}), got {self.adapter_slots}")
        unknown = [m for m in self.target_modules if m not in ALL_LORA_MODULES]
        if unknown:
            _bad("target_modules", unknown, f"unknown module(s); allowed: {list(ALL_LORA_MODULES)}")
        if len(set(self.target_modules)) != len(self.target_modules):
            _bad("target_modules", list(self.target_modules), "lists a module twice")
        if self.quant_block_size is not None:
            if self.dtype not in QUANTIZED_DTYPES:
                _bad("quant_block_size", self.quant_block_size, f"only applies to dtype {list(QUANTIZED_DTYPES)}")
            if self.quant_block_size < 16 or self.quant_block_size & (self.quant_block_size - 1):
                _bad("quant_block_size", self.quant_block_size, "must be a power of two in 16..256")
        if self.quant_accuracy_level is not None:
            level = self.quant_accuracy_level
            if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 4:
                _bad("quant_accuracy_level", level, "must be an integer in 0..4")
            if self.dtype not in QUANTIZED_DTYPES:
                _bad("quant_accuracy_level", level, f"only applies to dtype {list(QUANTIZED_DTYPES)}")
        if self.ai100_stage is not None and self.ai100_stage not in AI100_STAGES:
            _bad("ai100_stage", self.ai100_stage, f"must be one of {list(AI100_STAGES)}")
        if len(self.compiler_options) > MAX_COMPILER_OPTIONS:
            _bad("compiler_options", len(self.compiler_options), f"at most {MAX_COMPILER_OPTIONS} options")
        for opt in self.compiler_options:
            if (not isinstance(opt, str) or not opt.startswith("-") or len(opt) > MAX_COMPILER_OPTION_LEN
                    or any(c.isspace() or ord(c) < 32 for c in opt)):
                _bad("compiler_options", opt, f'each must be "-name" or "-name=value", no spaces, at most '
                     f"{MAX_COMPILER_OPTION_LEN} characters")
        if self.target == "ai100":
            if self.dtype not in AI100_DTYPES:
                _bad("dtype", self.dtype, f"ai100 bundles hold {list(AI100_DTYPES)} weights (the card computes in fp16: "
                     "-convert-to-fp16; use mxfp6_matmul for compressed weights)")
        else:
            if self.mxfp6_matmul:
                _bad("mxfp6_matmul", True, "only applies to target 'ai100'")
            if self.num_cores is not None:
                _bad("num_cores", self.num_cores, "only applies to target 'ai100'")
            if self.ai100_stage is not None:
                _bad("ai100_stage", self.ai100_stage, "only applies to target 'ai100'")
            if self.compiler_options:
                _bad("compiler_options", list(self.compiler_options), "only applies to target 'ai100'")
        return self

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["compiler_options"] = list(self.compiler_options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompileOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            _bad(unknown[0], d[unknown[0]], f"is not a compile option; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k in ("target_modules", "compiler_options") else v) for k, v in d.items()})


def _default(value: int | None, default: int) -> int:
    return default if value is None else value


def _bad(field_name: str, value: Any, why: str):
    raise InvalidArgument(f"options.{field_name}={value!r} is invalid: {why}",
                          field=f"options.{field_name}", value=value)
