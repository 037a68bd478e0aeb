"""PEFT LoRA adapter dir → per-slot, padded, pre-scaled bank tensors (numpy + JSON; no torch).

The compiler and the inference runtime build banks with this one module, so an adapter bound
into a running model is laid out exactly as at compile time:

  lora_a.{m}  [L, N, in, R]   A^T of each layer, zero-padded from the adapter's rank to R
  lora_b.{m}  [L, N, R, out]  B^T * scaling (alpha/r, or alpha/sqrt(r) with rsLoRA), zero-padded

N = adapter_slots + 1; slot 0 stays zero (the base model). ``rank_pattern``/``alpha_pattern`` are
honoured per module, the way PEFT resolves them. Anything the banks cannot express (DoRA,
modules_to_save, embedding or lm_head targets, LoRA biases, ...) is rejected with an error that
names the adapter, the field and the value.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loraflow.artifact import adapter_files
from loraflow.artifact.graph_contract import ALL_LORA_MODULES
from loraflow.errors import FailedPrecondition, InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

MAX_PATTERN_ENTRIES = 4096
# rank_pattern/alpha_pattern keys are regexes to PEFT; only module paths (no quantifiers, groups or
# alternations) are accepted, so a pattern can never be a catastrophic regex run against every module.
_PATTERN_KEY_RE = re.compile(r"[A-Za-z0-9_.\-]{1,256}")

# PEFT key of one LoRA matrix in a decoder block, e.g.
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_KEY_RE = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\."
    r"(?P<module>[a-z_]+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)
_BLOCK_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
             "qkv_proj": "self_attn", "gate_up_proj": "mlp"}  # the packed ones: Phi-3

# adapter_config.json fields the bank layout cannot express when set (truthy): (field, why).
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("use_dora", "DoRA needs a per-module magnitude vector and weight norm"),
    ("modules_to_save", "modules_to_save replaces base weights"),
    ("fan_in_fan_out", "fan_in_fan_out (Conv1D) layouts are not Llama-family linears"),
    ("layer_replication", "layer_replication changes the layer stack"),
    ("lora_bias", "lora_bias adds a bias to lora_B"),
    ("target_parameters", "target_parameters adapts raw parameters, not linears"),
    ("trainable_token_indices", "trainable_token_indices changes embeddings"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA) needs invocation-token logic"),
    ("use_qalora", "QALoRA pools inputs before lora_A"),
    ("use_bdlora", "block-diagonal LoRA is a different layout"),
    ("megatron_config", "Megatron-parallel LoRA is a different layout"),
)


@dataclass(frozen=True)
class BankSpec:
    """What an artifact's banks hold: layers L, rank R, slots (N = slots + 1), module shapes."""

    num_layers: int
    max_rank: int
    adapter_slots: int
    modules: Mapping[str, tuple[int, int]]  # module -> (in_features, out_features), canonical order
    architecture: str = ""

    @property
    def num_slots_with_base(self) -> int:
        return self.adapter_slots + 1

    def a_shape(self, module: str) -> tuple[int, int, int, int]:
        fin, _ = self.modules[module]
        return (self.num_layers, self.num_slots_with_base, fin, self.max_rank)

    def b_shape(self, module: str) -> tuple[int, int, int, int]:
        _, fout = self.modules[module]
        return (self.num_layers, self.num_slots_with_base, self.max_rank, fout)

    @classmethod
    def from_manifest(cls, manifest, adapter_slots: int | None = None) -> BankSpec:
        """From a loraflow.artifact.manifest.Manifest (kept duck-typed so this module imports nothing else);
        ``adapter_slots``: the runtime's slot count where the graph leaves it to the runtime (graph6 on),
        else (None) the compiled one."""
        g = manifest.graph
        slots = manifest.adapter_slots if adapter_slots is None else adapter_slots
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise InvalidArgument(f"adapter_slots must be a positive integer, got {slots!r}", field="adapter_slots",
                                  value=slots)
        return cls(num_layers=g.layers, max_rank=manifest.max_rank, adapter_slots=slots,
                   modules={m: (s.in_features, s.out_features) for m, s in g.lora_modules.items()},
                   architecture=manifest.base_model.architecture)


@dataclass(frozen=True)
class Adapter:
    """A PEFT LoRA adapter read from disk, before it is checked against any artifact."""

    name: str
    path: Path
    digest: str  # sha256 of adapter_model.safetensors ("" when read with digest=False)
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # modules that actually carry weights, canonical order
    config: Mapping[str, Any]
    # (layer, module) -> (A [r_m, in], B [out, r_m]) as float32 (views of one array for a packed file)
    weights: Mapping[tuple[int, str], tuple[np.ndarray, np.ndarray]]

    @property
    def num_layers_seen(self) -> int:
        return 1 + max(layer for layer, _ in self.weights)

    @property
    def max_module_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    def scaling(self, layer: int, module: str) -> float:
        """PEFT's scaling for one module, honouring rank_pattern/alpha_pattern."""
        key = _module_key(layer, module)
        r = _pattern_value(self.config.get("rank_pattern") or {}, key, self.r)
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, key, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _module_key(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_BLOCK_OF[module]}.{module}"


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _pattern_value(pattern: Mapping[str, Any], key: str, default: float) -> float:
    # PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\.)?({p})$", key) wins.
    for p, value in pattern.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return value
    return default


def adapter_digest(path: str | Path) -> str:
    """sha256 of the adapter's weights file (``path`` is the adapter dir or the file)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def read_adapter(name: str, path: str | Path, *, digest: bool = True) -> Adapter:
    """Read and sanity-check a PEFT adapter dir; raise InvalidArgument naming the adapter and field.

    ``digest=False`` leaves ``Adapter.digest`` empty: a second pass over the weights file that only a record
    needs (registration, the compiler's manifest), not a load into a slot, whose store copy was sha256-checked
    when it was fetched."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise InvalidArgument(
            f"adapter {name!r}: {path} is not a PEFT adapter dir (needs {CONFIG_FILE} and {WEIGHTS_FILE})",
            field="adapters", value=str(path))
    config = adapter_files.read_config(cfg_path)  # InvalidArgument naming the file when malformed

    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        _reject(name, "peft_type", peft_type, "only LORA adapters are supported")
    task_type = config.get("task_type")
    if task_type not in (None, "CAUSAL_LM"):
        _reject(name, "task_type", task_type, "only CAUSAL_LM adapters fit a decoder artifact")
    for field_name, why in _UNSUPPORTED:
        value = config.get(field_name)
        if value:
            _reject(name, field_name, value, why)
    bias = config.get("bias", "none")
    if bias != "none":
        _reject(name, "bias", bias, "trained biases change base weights; only bias='none' is supported")
    targets = config.get("target_modules")
    if isinstance(targets, list):  # a str is a regex or "all-linear"; the weights below are checked anyway
        # PEFT may write full module paths (model.layers.0.self_attn.q_proj); the leaf name is what counts.
        extra = sorted(str(t) for t in targets
                       if not isinstance(t, str) or t.rsplit(".", 1)[-1] not in ALL_LORA_MODULES)
        if extra:
            _reject(name, "target_modules", extra, f"only {list(ALL_LORA_MODULES)} can be adapted "
                    "(no embeddings or lm_head)")
    r = config.get("r")
    if not _positive_int(r):
        _reject(name, "r", r, "r must be a positive integer")
    alpha = config.get("lora_alpha", 8)
    if not _positive_finite(alpha):
        _reject(name, "lora_alpha", alpha, "lora_alpha must be a finite positive number")
    for pattern_field, valid, what in (("rank_pattern", _positive_int, "positive integers"),
                                       ("alpha_pattern", _positive_finite, "finite positive numbers")):
        pattern = config.get(pattern_field) or {}
        if not isinstance(pattern, dict) or len(pattern) > MAX_PATTERN_ENTRIES:
            shown = f"<{len(pattern)} entries>" if isinstance(pattern, dict) else f"<a JSON {type(pattern).__name__}>"
            _reject(name, pattern_field, shown, f"must be an object of at most {MAX_PATTERN_ENTRIES} module patterns")
        for p, v in pattern.items():
            if not _PATTERN_KEY_RE.fullmatch(p):
                _reject(name, pattern_field, f"<{len(p)}-char key>" if len(p) > 128 else p,
                        "pattern keys must be module paths of at most 256 characters of [A-Za-z0-9_.-]")
            if not valid(v):
                _reject(name, f"{pattern_field}[{p!r}]", v, f"pattern values must be {what}")

    raw = adapter_files.read_float_tensors(w_path)  # InvalidArgument naming the file when malformed
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, arr in raw.items():
        m = _KEY_RE.match(key)
        if m is None or m["module"] not in _BLOCK_OF or _BLOCK_OF[m["module"]] != m["block"]:
            _reject(name, "weights", key, "only lora_A/lora_B of q/k/v/o_proj, gate/up/down_proj and packed qkv/gate_up_proj "
                    "in decoder layers are supported (no embeddings, lm_head or biases)")
        pairs.setdefault((int(m["layer"]), m["module"]), {})[m["ab"]] = arr
    if not pairs:
        _reject(name, "weights", str(w_path), "the adapter holds no LoRA weights")

    weights: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            _reject(name, "weights", f"layers.{layer}.{module}", "lora_A and lora_B must both be present")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            _reject(name, "weights", f"layers.{layer}.{module}: A{list(a.shape)} B{list(b.shape)}",
                    "lora_A must be [r, in] and lora_B [out, r]")
        expected = _pattern_value(config.get("rank_pattern") or {}, _module_key(layer, module), r)
        if a.shape[0] != expected:
            field_name = "r" if expected == r else "rank_pattern"
            _reject(name, field_name, expected, f"layers.{layer}.{module} has rank {a.shape[0]} in the weights; "
                    f"scaling by lora_alpha/{expected} would be wrong")
        weights[(layer, module)] = (a.astype(np.float32, copy=False), b.astype(np.float32, copy=False))

    targets = tuple(m for m in ALL_LORA_MODULES if any(mod == m for _, mod in weights))
    return Adapter(name=name, path=path, digest=adapter_digest(w_path) if digest else "", r=int(r),
                   lora_alpha=float(alpha),
                   use_rslora=bool(config.get("use_rslora", False)), target_modules=targets,
                   config=config, weights=weights)


def check_fits(adapter: Adapter, spec: BankSpec) -> None:
    """Raise unless ``adapter`` can be written into a slot of banks laid out by ``spec``."""
    name = adapter.name
    extra = [m for m in adapter.target_modules if m not in spec.modules]
    if extra:
        raise FailedPrecondition(
            f"adapter {name!r}: target_modules {extra} are not adapted by the artifact "
            f"(it covers {list(spec.modules)})", field="target_modules", value=extra,
            metadata={"adapter": name})
    rank = adapter.max_module_rank
    if rank > spec.max_rank:
        field_name = "r" if rank == adapter.r else "rank_pattern"
        raise FailedPrecondition(f"adapter {name!r}: r={rank} exceeds the artifact's max_rank={spec.max_rank}",
                                 field=field_name, value=rank, metadata={"adapter": name})
    if adapter.num_layers_seen > spec.num_layers:
        raise FailedPrecondition(
            f"adapter {name!r}: has weights for layer {adapter.num_layers_seen - 1} but the base model has "
            f"{spec.num_layers} layers (trained for another architecture?)", field="layers",
            value=adapter.num_layers_seen, metadata={"adapter": name})
    for (layer, module), (a, b) in adapter.weights.items():
        fin, fout = spec.modules[module]
        if a.shape[1] != fin or b.shape[0] != fout:
            raise FailedPrecondition(
                f"adapter {name!r}: layers.{layer}.{module} maps {a.shape[1]}→{b.shape[0]} features but the "
                f"base model's {module} maps {fin}→{fout} (trained for another architecture?)",
                field=f"{module}.shape", value=[a.shape[1], b.shape[0]], metadata={"adapter": name})


def slot_tensors(adapter: Adapter, spec: BankSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module the adapter touches: (A^T [L, in, w], B^T * scaling [L, w, out]) for the leading w rank columns
    of one bank slot, w the module's widest rank over its layers (<= R; ``write_slot_tensors`` leaves the columns
    past it zero). The modules it does not touch are left out (zeroed by the write): a q,v adapter's slot is its
    q and v ranks' worth, not a slot of zeros per module at R to allocate, write and copy."""
    check_fits(adapter, spec)
    by_module: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for (layer, module), (a, b) in adapter.weights.items():
        by_module.setdefault(module, []).append((layer, a, b))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, (fin, fout) in spec.modules.items():
        entries = by_module.get(module)
        if not entries:
            continue
        width = max(a.shape[0] for _, a, _ in entries)
        # Every layer at the full width overwrites every element: no zeros to write first.
        whole = len(entries) == spec.num_layers and all(a.shape[0] == width for _, a, _ in entries)
        alloc = np.empty if whole else np.zeros
        a_slot = alloc((spec.num_layers, fin, width), np.float32)
        b_slot = alloc((spec.num_layers, width, fout), np.float32)
        for layer, a, b in entries:  # a [r, in], b [out, r]
            r = a.shape[0]
            a_slot[layer, :, :r] = a.T  # [in, r]
            np.multiply(b.T, adapter.scaling(layer, module), out=b_slot[layer, :r, :])  # [r, out]
        out[module] = (a_slot, b_slot)
    return out


def empty_banks(spec: BankSpec, dtype: str | np.dtype = np.float32, *,
                zeros: Callable[..., np.ndarray] = np.zeros) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Zeroed banks (every slot is the base model) keyed by module. ``zeros(shape, dtype)`` allocates each bank:
    serving passes ``small_page_zeros`` (its slots are written one at a time, over the server's life)."""
    banks_a = {m: zeros(spec.a_shape(m), dtype) for m in spec.modules}
    banks_b = {m: zeros(spec.b_shape(m), dtype) for m in spec.modules}
    return banks_a, banks_b


def write_slot(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray], slot: int,
               adapter: Adapter, spec: BankSpec, held: Mapping[str, int] | None = None) -> dict[str, int]:
    """Write ``adapter`` into ``slot`` (1..adapter_slots) of the banks in place: what ``write_slot_tensors`` of its
    ``slot_tensors`` writes, laid out straight into the banks (no slot-sized arrays in between, whose fresh pages
    cost an all-linear rank-16 load more than the copy). ``held`` and the result as for ``write_slot_tensors``."""
    if not 1 <= slot <= spec.adapter_slots:
        raise InvalidArgument(f"adapter {adapter.name!r}: slot {slot} is outside 1..{spec.adapter_slots}",
                              field="slot", value=slot)
    check_fits(adapter, spec)
    widths: dict[str, int] = {}  # module -> its widest rank over layers
    ranks: dict[str, dict[int, int]] = {}  # module -> layer -> rank
    for (layer, module), (a, _) in adapter.weights.items():
        widths[module] = max(widths.get(module, 0), a.shape[0])
        ranks.setdefault(module, {})[layer] = a.shape[0]
    _zero_past(banks_a, banks_b, slot, widths, held)
    for (layer, module), (a, b) in adapter.weights.items():  # a [r, in], b [out, r]
        r = a.shape[0]
        banks_a[module][layer, slot, :, :r] = a.T  # [in, r]
        np.multiply(b.T, adapter.scaling(layer, module), out=banks_b[module][layer, slot, :r, :])  # [r, out]
    for module, width in widths.items():  # a layer narrower than its module's width, or absent: zero up to it
        for layer in range(spec.num_layers):
            r = ranks[module].get(layer, 0)
            if r < width:
                banks_a[module][layer, slot, :, r:width] = 0
                banks_b[module][layer, slot, r:width, :] = 0
    return {m: widths[m] for m in banks_a if m in widths}


def _zero_past(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray], slot: int,
               widths: Mapping[str, int], held: Mapping[str, int] | None) -> None:
    """Zero each module's rank columns of ``slot`` from ``widths[m]`` (0: absent) up to what ``held[m]`` says may
    be nonzero (None: not known, so R, zeroed only where a read finds weights)."""
    for module, a_bank in banks_a.items():
        b_bank = banks_b[module]
        width = widths.get(module, 0)
        before = a_bank.shape[3] if held is None else held.get(module, 0)
        if before > width:
            a_rest, b_rest = a_bank[:, slot, :, width:before], b_bank[:, slot, width:before, :]
            # Unknown contents: reading is cheap where writing is not (a never-written slot's pages are not even
            # allocated yet), so only what holds a previous adapter's weights is zeroed.
            if held is not None or a_rest.any() or b_rest.any():
                a_rest[...] = 0
                b_rest[...] = 0


def write_slot_tensors(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray], slot: int,
                       tensors: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       held: Mapping[str, int] | None = None) -> dict[str, int]:
    """Write ``slot_tensors`` output (module -> (A^T [L, in, w], B^T [L, w, out]), 1 <= w <= R) into the leading
    w rank columns of ``slot`` in place, cast to the banks' dtype; afterwards every other column of the slot, and
    every module absent from ``tensors``, is zero (the adapter does not touch it, so its delta there is zero).

    ``held``: module -> how many leading rank columns of the slot may be nonzero now (what the previous call on
    this slot returned; a module not in it is zero), so only those are zeroed; None: not known, so the rest of
    the slot is read to find what to zero. Returns module -> columns written (``held`` for the next call)."""
    unknown = sorted(m for m in tensors if m not in banks_a)
    if unknown:
        raise InvalidArgument(f"slot tensors for modules {unknown} the banks do not hold (they hold "
                              f"{list(banks_a)})", field="tensors", value=unknown)
    slots = next(iter(banks_a.values())).shape[1] if banks_a else 0
    if banks_a and not 1 <= slot < slots:
        raise InvalidArgument(f"slot {slot} is outside 1..{slots - 1} (slot 0 is the base model)", field="slot",
                              value=slot)
    # Every shape is checked before anything is written, so a refused call leaves the slot as it was.
    for module, (a_slot, b_slot) in tensors.items():
        a_bank, b_bank = banks_a[module], banks_b[module]  # [L, N, in, R], [L, N, R, out]
        a_shape = tuple(np.shape(a_slot))
        width = a_shape[-1] if len(a_shape) == 3 else 0
        a_want = a_bank.shape[:1] + a_bank.shape[2:3] + (width,)
        b_want = b_bank.shape[:1] + (width,) + b_bank.shape[3:]
        for kind, value, want in (("A", a_slot, a_want), ("B", b_slot, b_want)):
            if not 1 <= width <= a_bank.shape[3] or tuple(np.shape(value)) != want:
                full = (a_bank.shape[:1] + a_bank.shape[2:] if kind == "A" else b_bank.shape[:1] + b_bank.shape[2:])
                raise InvalidArgument(f"{module} {kind} slot tensor has shape {list(np.shape(value))}, the bank "
                                      f"slot is {list(full)} (A [L, in, w] and B [L, w, out] may hold its leading "
                                      "w <= R rank columns)", field=f"tensors.{module}",
                                      value=list(np.shape(value)))
    written = {m: tensors[m][0].shape[-1] for m in banks_a if m in tensors}
    _zero_past(banks_a, banks_b, slot, written, held)
    for module, width in written.items():
        a_slot, b_slot = tensors[module]
        banks_a[module][:, slot, :, :width] = a_slot  # [L, in, w]
        banks_b[module][:, slot, :width, :] = b_slot  # [L, w, out]
    return written


def used_rank(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading rank columns of A^T [..., in, R] / rows of B^T [..., R, out] (one slot's, or a
    whole bank's) hold anything but zeros: the rank the slot's delta needs, the rest is padding."""
    a_used = np.any(a != 0, axis=tuple(range(a.ndim - 1)))  # [..., in, R] -> [R]
    b_used = np.any(b != 0, axis=tuple(range(b.ndim - 2)) + (b.ndim - 1,))  # [..., R, out] -> [R]
    nonzero = a_used | b_used  # [R]
    return int(np.flatnonzero(nonzero)[-1]) + 1 if nonzero.any() else 0


def slot_rank(tensors: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """The rank one slot's ``slot_tensors`` need: the widest module's nonzero columns (0 when all zero), what
    ``used_rank`` gives, found from the last column down (a trained adapter's is nonzero: one column read)."""
    rank = 0
    for a, b in tensors.values():  # A^T [L, in, w], B^T [L, w, out]
        for column in range(a.shape[-1] - 1, rank - 1, -1):
            if a[..., column].any() or b[..., column, :].any():
                rank = column + 1
                break
    return rank


def slot_module_ranks(tensors: Mapping[str, tuple[np.ndarray, np.ndarray]], modules: Sequence[str]) -> np.ndarray:
    """int64 [P]: the rank one slot's ``slot_tensors`` need in each of the banks' ``modules`` (bank order; 0
    for a module the adapter does not touch). Its max is ``slot_rank``."""
    return np.array([slot_rank({m: tensors[m]}) if m in tensors else 0 for m in modules], np.int64)  # [P]


def bank_module_ranks(banks_a: Mapping[str, np.ndarray], banks_b: Mapping[str, np.ndarray]) -> np.ndarray:
    """int64 [N, P]: the rank each slot of [L, N, in, R] / [L, N, R, out] banks uses in each bank module (the banks'
    order; slot 0 and empty slots 0), graph8's ``lora_ranks``; its max over modules (``.max(axis=1, initial=0)``)
    is graph5-7's [N]."""
    slots = next(iter(banks_a.values())).shape[1] if banks_a else 0
    return np.array([[used_rank(banks_a[m][:, s], banks_b[m][:, s]) for m in banks_a] for s in range(slots)],
                    np.int64).reshape(slots, len(banks_a))  # [N, P]


def clear_slot(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray], slot: int) -> None:
    """Zero ``slot`` so it behaves as the base model."""
    if slot == 0:
        raise InvalidArgument("slot 0 is the base model and is always zero", field="slot", value=slot)
    for m in banks_a:
        banks_a[m][:, slot] = 0
        banks_b[m][:, slot] = 0


def _reject(name: str, field_name: str, value: Any, why: str):
    raise InvalidArgument(f"adapter {name!r}: {field_name}={value!r} is not supported: {why}",
                          field=field_name, value=value, metadata={"adapter": name})
