"""Build an artifact directory: base model + ordered adapters + options → graph, files, manifest.

Stages (each reported through ``progress(stage, fraction, message)`` with its duration, with
``check()`` called between them so a cancelled job stops): load, validate, export, optimize,
verify, write. ``manifest.json`` is written last, so a directory with a manifest is complete.

``plan_artifact`` does the cheap part (read config and adapters, check the checkpoint's shards, resolve
and validate options, compute the artifact id) so the service can validate and detect cache hits before
queueing. The artifact id hashes the checkpoint's file hashes, which the store already records for a
published model: planning reads no weight.

Building streams (``CheckpointWeights``): the fused and the AI 100 graphs are written one tensor at a time
and verified against the layer-by-layer reference; only the traced graph (fp16 for GPUs, and models the
fused builder cannot express) still materialises the decoder to trace it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from loraflow.artifact import lora_bank
from loraflow.artifact.manifest import (
    AdapterEntry,
    BaseModelInfo,
    FileEntry,
    Manifest,
    compute_artifact_id,
    file_sha256,
)
from loraflow.errors import FailedPrecondition, InvalidArgument
from loraflow.options.names import validate_name
from loraflow.security.safe_files import MAX_CONFIG_BYTES, confined_file, read_regular_file
from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.backends import pick_backend
from services.compiler.backends.shared import (
    BuildJob,
    Progress,
    Stages,
    bank_feeds,
    build_banks,
    copy_tokenizer,
    verification_banks,
)
from services.compiler.modeling.checkpoint import weight_files
from services.compiler.modeling.config import DecoderConfig
from services.compiler.modeling.weights import CheckpointWeights
from services.compiler.options import DEFAULT_CTX_LEN, CompileOptions

# Bump when the graph or bank layout changes: it is part of every artifact id.
# graph2: the fused (GroupQueryAttention) graph; graph3: its logits_index input (batched prefill).
# 0.3: artifacts also carry model.native.onnx (LoraRows) where the compiling host has loraflow/native.
# 0.4: streamed: a tied head is stored once (FusedMatMul transB in fp32, GatherBlockQuantized over the
#      head's blocks in int4/int8); the ai100 graph is written node by node (fp32 or fp16 weights).
# graph5: the fused graphs' lora_ranks input (LoraRows computes each row's own rank).
# graph6: the fused graphs' adapter slot count N is symbolic (banks [L*N, ...], LoraRows layer/num_layers): the
# runtime chooses how many slots to keep resident.
# graph7: model.native.onnx's SwiGLU activation is one ai.loraflow.SwiGlu node over the packed gate|up.
# graph8: model.native.onnx's lora_ranks is [N, P], a rank per slot and adapted module (LoraRows rank_column), so a
# module a row's adapter does not touch costs that row nothing.
# graph9: fp32 linears are FusedMatMul(transB) over the checkpoint's [N, K] (no transposed [K, N] copy): the same IO,
# other weight bytes.
COMPILER_VERSION = "loraflow-compiler/0.5.1+graph9-fp32-nk"

STAGES = ("load", "validate", "export", "optimize", "verify", "write")

def fingerprint_from_hashes(config: dict[str, Any], weight_hashes: Sequence[tuple[str, str]]) -> str:
    """sha256 over config.json (canonical JSON) and "name:sha256" of every weight file, by name: the same
    value whether the hashes were computed here or recorded by the store when the model was published."""
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for name, sha in sorted(weight_hashes):
        h.update(f"\n{name}:{sha}".encode())
    return h.hexdigest()


def base_fingerprint(model_dir: str | Path) -> str:
    """fingerprint_from_hashes of a local checkpoint (hashes every weight file)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    hashes = []
    for path in weight_files(model_dir):
        if not path.is_file():
            raise InvalidArgument(f"{model_dir} lacks weight file {path.name}", field="base_model",
                                  value=str(model_dir))
        hashes.append((path.name, file_sha256(path)))
    return fingerprint_from_hashes(config, hashes)


def plan_artifact(base_model_dir: str | Path | None, adapters: Sequence[tuple[str, Path]], options: CompileOptions,
                  *, fingerprint: str | None = None, config: DecoderConfig | None = None) -> ArtifactPlan:
    """Validate base, adapters and options; compute the artifact id. Raises InvalidArgument /
    FailedPrecondition naming the field and value (ai100 without the SDK is FailedPrecondition).

    With a local ``base_model_dir`` its config is read and its shards checked (headers only: a missing,
    truncated or unsupported shard is an InvalidArgument naming the file). A model still in the store is
    planned from its ``config`` and ``fingerprint`` alone (``base_model_dir`` None): no weight is read."""
    if base_model_dir is None:
        if config is None or fingerprint is None:
            raise InvalidArgument("a base model that is not local needs its config and fingerprint",
                                  field="base_model", value=None)
        cfg = config
    else:
        base_model_dir = Path(base_model_dir)
        cfg = config or DecoderConfig.from_model_dir(base_model_dir)
        CheckpointWeights.open(base_model_dir, cfg)  # shards present, whole, of supported dtypes and shapes
    names = [validate_name("adapters", name) for name, _ in adapters]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidArgument(f"adapter {dup!r} is listed twice", field="adapters", value=dup)
    options.validate(num_adapters=len(adapters))
    if options.ctx_len is None and cfg.max_position_embeddings < DEFAULT_CTX_LEN:
        # The default context must fit the model; an explicit ctx_len that does not is still an error.
        options = replace(options, ctx_len=cfg.max_position_embeddings)
    loaded = tuple(lora_bank.read_adapter(name, Path(path)) for name, path in adapters)
    shapes = cfg.lora_module_shapes()  # the modules this family has (Phi-3: packed qkv_proj, gate_up_proj)
    resolved = options.resolve(adapter_ranks=[a.max_module_rank for a in loaded],
                               adapter_targets=[a.target_modules for a in loaded],
                               default_modules=tuple(shapes)).validate(len(loaded))
    missing = [m for m in resolved.target_modules if m not in shapes]
    if missing:
        raise InvalidArgument(f"{cfg.architecture} models have no {missing} projection(s) to adapt; its modules: "
                              f"{list(shapes)}", field="options.target_modules" if options.target_modules
                              else "adapters", value=missing)
    if resolved.target == "ai100":
        from services.compiler import ai100

        ai100.check_compiler_options(resolved.compiler_options)
        if resolved.ai100_stage == "compile":
            ai100.require_sdk()  # "export" publishes the bundle without the SDK
    if resolved.target == "onnxruntime" and resolved.dtype == "int4":
        from services.compiler.fused.builder import fused_graph_supported

        why = fused_graph_supported(cfg)
        if why:
            raise FailedPrecondition(f"options.dtype='int4' needs the fused graph, which cannot express this "
                                     f"model: {why}", field="options.dtype", value="int4")
    if resolved.ctx_len > cfg.max_position_embeddings:
        raise InvalidArgument(f"options.ctx_len={resolved.ctx_len} exceeds the model's max_position_embeddings="
                              f"{cfg.max_position_embeddings}", field="options.ctx_len", value=resolved.ctx_len)
    if cfg.sliding_window is not None and resolved.ctx_len > cfg.sliding_window:
        raise InvalidArgument(f"options.ctx_len={resolved.ctx_len} exceeds the model's sliding_window="
                              f"{cfg.sliding_window} (windowed attention is not implemented)",
                              field="options.ctx_len", value=resolved.ctx_len)
    spec = lora_bank.BankSpec(num_layers=cfg.num_layers, max_rank=int(resolved.max_rank),
                              adapter_slots=int(resolved.adapter_slots),
                              modules={m: shapes[m] for m in resolved.target_modules},
                              architecture=cfg.architecture)
    for adapter in loaded:
        lora_bank.check_fits(adapter, spec)
    fp = fingerprint or base_fingerprint(base_model_dir)  # base_model_dir is local here (checked above)
    id_options = resolved.to_dict()
    if resolved.target == "ai100":
        id_options["ai100_graph"] = ai100.GRAPH_VERSION  # the ai100 graph changes on its own schedule
    artifact_id = compute_artifact_id(fp, [a.digest for a in loaded], id_options, COMPILER_VERSION,
                                      adapter_names=names)
    return ArtifactPlan(artifact_id=artifact_id, options=resolved, config=cfg, base_fingerprint=fp,
                        adapters=loaded, bank_spec=spec)


def build_artifact(base_model_dir: Path, adapters: list[tuple[str, Path]], options: CompileOptions,
                   out_dir: Path, *, progress: Progress | None = None, check: Callable[[], None] | None = None,
                   base_source: str | None = None, plan: ArtifactPlan | None = None) -> Manifest:
    """Compile into ``out_dir`` (created; must not hold a manifest yet) and return the manifest: plan, pick the
    target's backend (``services/compiler/backends/``), export, verify, write the manifest."""
    from services.compiler.export import BankShape

    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    if (out_dir / "manifest.json").exists():
        raise FailedPrecondition(f"{out_dir} already holds an artifact", field="out_dir", value=str(out_dir))
    stages = Stages(report=progress or (lambda stage, fraction, message: None), stop=check or (lambda: None))

    # load + validate: every shard checked (headers only) before anything heavy starts
    t0 = time.perf_counter()
    stages.report("load", 0.0, f"reading {base_model_dir.name} and {len(adapters)} adapter(s)")
    plan = plan or plan_artifact(base_model_dir, adapters, options)
    weights = CheckpointWeights.open(base_model_dir, plan.config)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages.done("load", 0.05, f"planned artifact {plan.artifact_id}", t0)
    t0 = time.perf_counter()
    opts = plan.options
    banks_a, banks_b = build_banks(plan)
    stages.done("validate", 0.15, f"{plan.config.architecture}: {plan.config.num_layers} layers, "
                f"{len(plan.adapters)} adapter(s) fit {opts.adapter_slots} slots at rank {opts.max_rank}", t0)

    feeds, occupied = verification_banks(bank_feeds(banks_a, banks_b), len(plan.adapters))
    job = BuildJob(plan=plan, base_model_dir=base_model_dir, out_dir=out_dir, weights=weights,
                   banks=BankShape(adapter_slots=int(opts.adapter_slots), max_rank=int(opts.max_rank)),
                   banks_a=banks_a, banks_b=banks_b, feeds=feeds, occupied=occupied,
                   lora_modules=tuple(m for m in opts.target_modules))
    backend = pick_backend(plan)
    exported = backend.export(job, stages)
    extra: dict[str, Any] = {"verify": backend.verify(job, exported, stages)}
    extra.update(exported.extra)
    extra.update(backend.finish(job, exported, stages))

    # write
    t0 = time.perf_counter()
    chat_template = copy_tokenizer(base_model_dir, out_dir / "tokenizer")
    generation_config = _generation_config(base_model_dir)
    (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
    entries = []
    for slot, adapter in enumerate(plan.adapters, start=1):
        rel = f"adapters/{adapter.name}"
        dst = out_dir / rel
        dst.mkdir(parents=True, exist_ok=True)
        for name in (lora_bank.CONFIG_FILE, lora_bank.WEIGHTS_FILE):
            # Never copy a link's target from outside the adapter directory into the artifact.
            shutil.copyfile(confined_file(adapter.path, name, field=f"adapter {adapter.name}"), dst / name)
        entries.append(AdapterEntry(slot=slot, name=adapter.name, digest=adapter.digest, r=adapter.r,
                                    lora_alpha=adapter.lora_alpha, use_rslora=adapter.use_rslora,
                                    target_modules=adapter.target_modules, path=rel))
    files = tuple(FileEntry(path=str(p.relative_to(out_dir)), size=p.stat().st_size,
                            sha256=exported.digests.get(str(p.relative_to(out_dir))) or file_sha256(p))
                  for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != "manifest.json")
    extra["timings"] = {k: round(v, 3) for k, v in stages.timings.items()}
    cfg = plan.config
    manifest = Manifest(
        artifact_id=plan.artifact_id,
        compiler_version=COMPILER_VERSION,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        base_model=BaseModelInfo(source=base_source or str(base_model_dir), fingerprint=plan.base_fingerprint,
                                 architecture=cfg.architecture, config=cfg.to_dict()),
        options=opts.to_dict(),
        graph=exported.graph,
        adapters=tuple(entries),
        tokenizer_dir="tokenizer",
        chat_template=chat_template,
        generation_config=generation_config,
        files=files,
        specializations=exported.specializations,
        extra=extra,
    )
    manifest.save(out_dir / "manifest.json")
    stages.timings["write"] = time.perf_counter() - t0
    stages.report("write", 1.0, f"manifest written with {len(files)} files ({stages.timings['write']:.1f}s)")
    return manifest


def _read_json(model_dir: Path, name: str) -> dict[str, Any]:
    """A bounded JSON object from inside the model directory; errors name the file, never its bytes."""
    path = confined_file(model_dir, name, field="base_model")
    try:
        data = json.loads(read_regular_file(path, field="base_model", limit=MAX_CONFIG_BYTES))
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument(f"base_model {name} is not valid JSON", field="base_model",
                              value=str(path)) from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"base_model {name} is not a JSON object", field="base_model", value=str(path))
    return data


def _generation_config(base_model_dir: Path) -> dict[str, Any]:
    """eos/pad/bos ids from generation_config.json, falling back to config.json."""
    merged: dict[str, Any] = _read_json(base_model_dir, "config.json")
    gen_path = base_model_dir / "generation_config.json"
    gen = _read_json(base_model_dir, "generation_config.json") if gen_path.exists() else {}
    merged.update({k: v for k, v in gen.items() if v is not None})
    eos = merged.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
    out: dict[str, Any] = {"eos_token_ids": eos_ids, "pad_token_id": merged.get("pad_token_id"),
                           "bos_token_id": merged.get("bos_token_id")}
    for key in ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample", "max_new_tokens"):
        if key in gen:
            out[key] = gen[key]
    return out
