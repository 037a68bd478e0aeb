"""The artifact's ``manifest.json``: written last by the compiler, read by the inference service.

Plain frozen dataclasses and JSON; no torch, so the inference image can read it. ``Manifest.load``
rejects a file of another ``format_version`` or with missing fields with an InvalidArgument that
names the field, because a manifest is input the runtime did not write itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.artifact import graph_contract as gc
from loraflow.errors import InvalidArgument

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"


# The layouts a runtime knows; it must not guess at another (the first is what old manifests mean).
KV_LAYOUTS = (gc.KV_LAYOUT_TIME_MAJOR, gc.KV_LAYOUT_SHARED)


def _kv_layout(value: Any) -> str:
    if value not in KV_LAYOUTS:
        raise InvalidArgument(f"manifest graph.kv_layout {value!r} is not one of {list(KV_LAYOUTS)} (an artifact "
                              "from a newer compiler? recompile it)", field="graph.kv_layout", value=value)
    return str(value)


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: dtype is a numpy dtype name, dims are ints or symbolic names."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=tuple(d["shape"]))


@dataclass(frozen=True)
class LoraModuleSpec:
    """Feature sizes of one adapted module: lora_a is [L, N, in, R], lora_b is [L, N, R, out]."""

    in_features: int
    out_features: int

    def to_dict(self) -> dict[str, int]:
        return {"in": self.in_features, "out": self.out_features}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraModuleSpec:
        return cls(in_features=int(d["in"]), out_features=int(d["out"]))


@dataclass(frozen=True)
class GraphSpec:
    """The ONNX graph of the artifact (names follow loraflow.artifact.graph_contract)."""

    file: str
    target: str
    dtype: str  # numpy dtype name of the float inputs/outputs: "float32" or "float16"
    layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    lora_modules: Mapping[str, LoraModuleSpec]  # canonical order (graph_contract.LORA_TARGET_MODULES)
    # "time-major" (traced graph: past [P, F, H, D] in, new K/V out) or "shared-buffer" (fused graph:
    # GroupQueryAttention updates [B, H, ctx_len, D] cache views in place); see graph_contract.py.
    kv_layout: str = gc.KV_LAYOUT_TIME_MAJOR
    # The same graph with loraflow/native's LoraRows kernel ("" = none): a runtime that can load the
    # kernel runs it, any other runs ``file``. Both were verified before the artifact was published.
    native_file: str = ""
    # Inputs native_file takes beyond ``inputs`` (graph5: lora_ranks [N]); () for older artifacts.
    native_inputs: tuple[TensorSpec, ...] = ()

    @property
    def shared_kv(self) -> bool:
        return self.kv_layout == gc.KV_LAYOUT_SHARED

    def to_dict(self) -> dict[str, Any]:
        return {
            "kv_layout": self.kv_layout,
            "native_file": self.native_file,
            "native_inputs": [_tensor_dict(t) for t in self.native_inputs],
            "file": self.file,
            "target": self.target,
            "dtype": self.dtype,
            "layers": self.layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "lora_modules": {m: s.to_dict() for m, s in self.lora_modules.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphSpec:
        return cls(
            file=str(d["file"]),
            target=str(d["target"]),
            dtype=str(d["dtype"]),
            layers=int(d["layers"]),
            num_kv_heads=int(d["num_kv_heads"]),
            head_dim=int(d["head_dim"]),
            vocab_size=int(d["vocab_size"]),
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            lora_modules={m: LoraModuleSpec.from_dict(s) for m, s in d["lora_modules"].items()},
            kv_layout=_kv_layout(d.get("kv_layout", KV_LAYOUTS[0])),  # manifests before the fused graph lack it
            native_file=str(d.get("native_file", "")),
            native_inputs=tuple(TensorSpec.from_dict(t) for t in d.get("native_inputs", ())),
        )

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


def _tensor_dict(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


@dataclass(frozen=True)
class BaseModelInfo:
    """Where the base came from and the dims the runtime needs without reading config.json."""

    source: str
    fingerprint: str
    architecture: str  # llama | mistral | qwen2
    config: Mapping[str, Any]  # hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size, ...

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "fingerprint": self.fingerprint,
                "architecture": self.architecture, "config": dict(self.config)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaseModelInfo:
        return cls(source=str(d["source"]), fingerprint=str(d["fingerprint"]),
                   architecture=str(d["architecture"]), config=dict(d["config"]))


@dataclass(frozen=True)
class AdapterEntry:
    """One occupied slot: ``path`` is relative to the artifact dir (adapters/<name>)."""

    slot: int
    name: str
    digest: str
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    path: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AdapterEntry:
        return cls(slot=int(d["slot"]), name=str(d["name"]), digest=str(d["digest"]), r=int(d["r"]),
                   lora_alpha=float(d["lora_alpha"]), use_rslora=bool(d["use_rslora"]),
                   target_modules=tuple(d["target_modules"]), path=str(d["path"]))


@dataclass(frozen=True)
class FileEntry:
    path: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileEntry:
        return cls(path=str(d["path"]), sha256=str(d["sha256"]), size=int(d["size"]))


@dataclass(frozen=True)
class Manifest:
    artifact_id: str
    compiler_version: str
    created: str  # RFC 3339 UTC
    base_model: BaseModelInfo
    options: Mapping[str, Any]  # CompileOptions.to_dict() with defaults resolved
    graph: GraphSpec
    adapters: tuple[AdapterEntry, ...]
    tokenizer_dir: str
    chat_template: str | None
    generation_config: Mapping[str, Any]  # at least {"eos_token_ids": [...]}
    files: tuple[FileEntry, ...]
    specializations: tuple[Mapping[str, Any], ...] | None = None  # ai100 only
    format_version: int = FORMAT_VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)  # ai100: qpc dir, command; free-form

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "artifact_id": self.artifact_id,
            "compiler_version": self.compiler_version,
            "created": self.created,
            "base_model": self.base_model.to_dict(),
            "options": dict(self.options),
            "graph": self.graph.to_dict(),
            "adapters": [a.to_dict() for a in self.adapters],
            "tokenizer_dir": self.tokenizer_dir,
            "chat_template": self.chat_template,
            "generation_config": dict(self.generation_config),
            "files": [asdict(f) for f in self.files],
            "specializations": None if self.specializations is None else [dict(s) for s in self.specializations],
            "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidArgument(f"manifest format_version {version!r} is not supported (expected {FORMAT_VERSION})",
                                  field="manifest.format_version", value=version)
        try:
            specs = d.get("specializations")
            return cls(
                format_version=int(version),
                artifact_id=str(d["artifact_id"]),
                compiler_version=str(d["compiler_version"]),
                created=str(d["created"]),
                base_model=BaseModelInfo.from_dict(d["base_model"]),
                options=dict(d["options"]),
                graph=GraphSpec.from_dict(d["graph"]),
                adapters=tuple(AdapterEntry.from_dict(a) for a in d["adapters"]),
                tokenizer_dir=str(d["tokenizer_dir"]),
                chat_template=d.get("chat_template"),
                generation_config=dict(d["generation_config"]),
                files=tuple(FileEntry.from_dict(f) for f in d["files"]),
                specializations=None if specs is None else tuple(dict(s) for s in specs),
                extra=dict(d.get("extra") or {}),
            )
        except KeyError as exc:
            raise InvalidArgument(f"manifest is missing field {exc.args[0]!r}", field="manifest",
                                  value=exc.args[0]) from exc

    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (a file, or a dir → dir/manifest.json) via a temp file + rename."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise InvalidArgument(f"no manifest at {path}", field="manifest", value=str(path)) from exc
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"manifest {path} is not valid JSON: {exc}", field="manifest",
                                  value=str(path)) from exc
        return cls.from_dict(data)

    # Conveniences for the runtime.
    @property
    def adapter_slots(self) -> int:
        return int(self.options["adapter_slots"])

    @property
    def max_rank(self) -> int:
        return int(self.options["max_rank"])

    def adapter(self, name: str) -> AdapterEntry | None:
        for a in self.adapters:
            if a.name == name:
                return a
        return None


def compute_artifact_id(base_fingerprint: str, adapter_digests: Sequence[str], options: Mapping[str, Any],
                        compiler_version: str, *, adapter_names: Sequence[str] = ()) -> str:
    """Content address of an artifact: 32 hex chars of sha256 over a canonical JSON document.

    Order of ``adapter_digests`` matters (it is the slot order). Adapter names are part of the
    address when given, because the manifest maps names to slots: the same weights under another
    name are another artifact.
    """
    doc = {
        "base": base_fingerprint,
        "adapters": list(adapter_digests),
        "names": list(adapter_names),
        "options": _canonical(options),
        "compiler": compiler_version,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
