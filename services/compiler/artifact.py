"""Build an artifact directory: base model + ordered adapters + options → graph, files, manifest.

Stages (each reported through ``progress(stage, fraction, message)`` with its duration, with
``check()`` called between them so a cancelled job stops): load, validate, export, optimize,
verify, write. ``manifest.json`` is written last, so a directory with a manifest is complete.

``plan_artifact`` does the cheap part (read config and adapters, resolve and validate options,
compute the artifact id) so the service can validate and detect cache hits before queueing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from loraflow import lora_bank
from loraflow.errors import FailedPrecondition, InvalidArgument
from loraflow.manifest import (
    AdapterEntry,
    BaseModelInfo,
    FileEntry,
    Manifest,
    compute_artifact_id,
    file_sha256,
)
from loraflow.names import validate_name
from loraflow.security.safe_files import MAX_CONFIG_BYTES, confined_file, read_regular_file
from services.compiler.modeling.config import DecoderConfig
from services.compiler.options import DEFAULT_CTX_LEN, CompileOptions

# Bump when the graph or bank layout changes: it is part of every artifact id.
# graph2: the fused (GroupQueryAttention) graph; graph3: its logits_index input (batched prefill).
# 0.3: artifacts also carry model.native.onnx (LoraRows) where the compiling host has loraflow/native.
COMPILER_VERSION = "loraflow-compiler/0.3.0+graph3-native"

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
STAGES = ("load", "validate", "export", "optimize", "verify", "write")

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class ArtifactPlan:
    """Everything decided before any heavy work: resolved options, adapters, id."""

    artifact_id: str
    options: CompileOptions  # resolved
    config: DecoderConfig
    base_fingerprint: str
    adapters: tuple[lora_bank.Adapter, ...]
    bank_spec: lora_bank.BankSpec


def base_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json (canonical JSON) and the sha256 of every weight file, by name."""
    from services.compiler.modeling.decoder import weight_files

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for path in weight_files(model_dir):
        if not path.is_file():
            raise InvalidArgument(f"{model_dir} lacks weight file {path.name}", field="base_model",
                                  value=str(model_dir))
        h.update(f"\n{path.name}:{file_sha256(path)}".encode())
    return h.hexdigest()


def plan_artifact(base_model_dir: str | Path, adapters: Sequence[tuple[str, Path]], options: CompileOptions,
                  *, fingerprint: str | None = None) -> ArtifactPlan:
    """Validate base, adapters and options; compute the artifact id. Raises InvalidArgument /
    FailedPrecondition naming the field and value (ai100 without the SDK is FailedPrecondition)."""
    base_model_dir = Path(base_model_dir)
    cfg = DecoderConfig.from_model_dir(base_model_dir)
    names = [validate_name("adapters", name) for name, _ in adapters]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InvalidArgument(f"adapter {dup!r} is listed twice", field="adapters", value=dup)
    options.validate(num_adapters=len(adapters))
    if options.ctx_len is None and cfg.max_position_embeddings < DEFAULT_CTX_LEN:
        # The default context must fit the model; an explicit ctx_len that does not is still an error.
        options = replace(options, ctx_len=cfg.max_position_embeddings)
    loaded = tuple(lora_bank.read_adapter(name, Path(path)) for name, path in adapters)
    resolved = options.resolve(adapter_ranks=[a.max_module_rank for a in loaded],
                               adapter_targets=[a.target_modules for a in loaded]).validate(len(loaded))
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
    shapes = cfg.lora_module_shapes()
    spec = lora_bank.BankSpec(num_layers=cfg.num_layers, max_rank=int(resolved.max_rank),
                              adapter_slots=int(resolved.adapter_slots),
                              modules={m: shapes[m] for m in resolved.target_modules},
                              architecture=cfg.architecture)
    for adapter in loaded:
        lora_bank.check_fits(adapter, spec)
    fp = fingerprint or base_fingerprint(base_model_dir)
    id_options = resolved.to_dict()
    if resolved.target == "ai100":
        id_options["ai100_graph"] = ai100.GRAPH_VERSION  # the ai100 graph changes on its own schedule
    artifact_id = compute_artifact_id(fp, [a.digest for a in loaded], id_options, COMPILER_VERSION,
                                      adapter_names=names)
    return ArtifactPlan(artifact_id=artifact_id, options=resolved, config=cfg, base_fingerprint=fp,
                        adapters=loaded, bank_spec=spec)


def build_banks(plan: ArtifactPlan) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    banks_a, banks_b = lora_bank.empty_banks(plan.bank_spec)
    for slot, adapter in enumerate(plan.adapters, start=1):
        lora_bank.write_slot(banks_a, banks_b, slot, adapter, plan.bank_spec)
    return banks_a, banks_b


def build_artifact(base_model_dir: Path, adapters: list[tuple[str, Path]], options: CompileOptions,
                   out_dir: Path, *, progress: Progress | None = None, check: Callable[[], None] | None = None,
                   base_source: str | None = None, plan: ArtifactPlan | None = None) -> Manifest:
    """Compile into ``out_dir`` (created; must not hold a manifest yet) and return the manifest."""
    from services.compiler.export import BankShape, export_onnxruntime
    from services.compiler.modeling.decoder import load_decoder

    report = progress or (lambda stage, fraction, message: None)
    stop = check or (lambda: None)
    base_model_dir, out_dir = Path(base_model_dir), Path(out_dir)
    if (out_dir / "manifest.json").exists():
        raise FailedPrecondition(f"{out_dir} already holds an artifact", field="out_dir", value=str(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, fraction: float, message: str, started: float) -> None:
        timings[name] = time.perf_counter() - started
        report(name, fraction, f"{message} ({timings[name]:.1f}s)")
        stop()

    # load + validate
    t0 = time.perf_counter()
    report("load", 0.0, f"reading {base_model_dir.name} and {len(adapters)} adapter(s)")
    plan = plan or plan_artifact(base_model_dir, adapters, options)
    stage("load", 0.05, f"planned artifact {plan.artifact_id}", t0)
    t0 = time.perf_counter()
    opts = plan.options
    decoder = load_decoder(base_model_dir, opts.target_modules)
    banks_a, banks_b = build_banks(plan)
    decoder.set_banks(banks_a, banks_b)
    stage("validate", 0.15, f"{plan.config.architecture}: {plan.config.num_layers} layers, "
          f"{len(plan.adapters)} adapter(s) fit {opts.adapter_slots} slots at rank {opts.max_rank}", t0)

    banks = BankShape(adapter_slots=int(opts.adapter_slots), max_rank=int(opts.max_rank))
    bank_feeds = _bank_feeds(banks_a, banks_b)
    extra: dict[str, Any] = {}
    specs = None
    known_digests: dict[str, str] = {}  # artifact files hashed while they were written
    if opts.target == "onnxruntime" and _uses_fused_graph(plan):
        from services.compiler.fused.builder import FusedGraphOptions
        from services.compiler.fused.export import export_fused

        fused = FusedGraphOptions(dtype=opts.dtype, ctx_len=int(opts.ctx_len), num_slots=banks.num_slots,
                                  max_rank=banks.max_rank, lora_modules=tuple(decoder.lora_modules),
                                  quant_block_size=int(opts.quant_block_size or 32),
                                  quant_accuracy_level=int(opts.quant_accuracy_level or 0))
        t0 = time.perf_counter()
        exported = export_fused(decoder, out_dir, fused)
        graph, export_times, dequantized = exported.graph, exported.timings, exported.dequantized
        known_digests.update(exported.digests)
        timings["export"] = export_times["export"]
        report("export", 0.5, f"fused ONNX {opts.dtype} graph written ({timings['export']:.1f}s)")
        stop()
        timings["optimize"] = export_times["save"]
        report("optimize", 0.6, f"weights saved ({timings['optimize']:.1f}s)")
        stop()
        t0 = time.perf_counter()
        verify_report, native_report = _verify_fused(out_dir, decoder, dequantized, graph, bank_feeds, opts,
                                                     len(plan.adapters))
        extra["verify"] = {"max_abs_diff": verify_report.max_abs_diff, "relative_diff": verify_report.relative_diff,
                           "tolerance": verify_report.tolerance, "tokens_match": verify_report.tokens_match,
                           "calls": verify_report.calls}
        if verify_report.quant_relative_diff is not None:
            extra["verify"]["quant_relative_diff_vs_float"] = verify_report.quant_relative_diff
            extra["verify"]["quant_token_agreement_vs_float"] = verify_report.quant_token_agreement
        if native_report is not None:
            extra["verify"]["native"] = {"max_abs_diff": native_report.max_abs_diff,
                                         "relative_diff": native_report.relative_diff,
                                         "tokens_match": native_report.tokens_match, "calls": native_report.calls}
        native_note = (f", native LoRA kernel {native_report.max_abs_diff:.3g}" if native_report is not None
                       else "")
        stage("verify", 0.85, f"the runtime's step driver matches PyTorch: max abs diff "
              f"{verify_report.max_abs_diff:.3g}{native_note}", t0)
    elif opts.target == "onnxruntime":
        t0 = time.perf_counter()
        graph, export_times = export_onnxruntime(decoder, out_dir, banks=banks, dtype=opts.dtype)
        timings["export"] = export_times["export"] + export_times.get("quantize", 0.0)
        report("export", 0.5, f"ONNX {opts.dtype} exported ({timings['export']:.1f}s)")
        stop()
        timings["optimize"] = export_times["optimize"]
        report("optimize", 0.6, f"ONNX Runtime graph optimisation ({timings['optimize']:.1f}s)")
        stop()
        t0 = time.perf_counter()
        verify_report = _verify_ort(out_dir / graph.file, decoder, graph, bank_feeds, opts, len(plan.adapters))
        extra["verify"] = {"max_abs_diff": verify_report.max_abs_diff, "relative_diff": verify_report.relative_diff,
                           "tolerance": verify_report.tolerance, "tokens_match": verify_report.tokens_match}
        stage("verify", 0.85, f"ONNX Runtime matches PyTorch: max abs diff {verify_report.max_abs_diff:.3g}", t0)
    else:
        from services.compiler import ai100, ai100_verify

        t0 = time.perf_counter()
        cb = ai100.continuous_batching(opts)
        graph = ai100.export_ai100(decoder, out_dir, banks=banks, ctx_len=int(opts.ctx_len), cb=cb)
        exe = ai100.require_sdk() if opts.ai100_stage == "compile" else None
        bundle = ai100.write_bundle(out_dir, opts, plan.config.num_layers, qaic_exec=exe)
        specs = bundle.specializations
        stage("export", 0.4, f"AI 100 bundle exported ({'continuous batching' if cb else 'static batch'})", t0)
        t0 = time.perf_counter()
        feeds, occupied = _verification_banks(bank_feeds, len(plan.adapters))
        verify_report = ai100_verify.verify_bundle(out_dir, graph, decoder, feeds, opts, occupied_slots=occupied)
        extra["verify"] = verify_report.to_dict()
        stage("verify", 0.5, "ONNX Runtime, driven as the card, matches PyTorch: max abs diff fp32 "
              + ", ".join(f"{r.precision} {r.max_abs_diff:.3g}" for r in verify_report.runs), t0)
        extra["ai100"] = bundle.to_dict()
        extra["qaic_exec"] = list(bundle.command)
        if opts.ai100_stage == "compile":
            t0 = time.perf_counter()
            qpc = ai100.compile_qpc(out_dir, bundle)
            extra["qpc_dir"] = qpc.name
            stage("optimize", 0.8, "qaic-exec compiled the QPC", t0)

    # write
    t0 = time.perf_counter()
    chat_template = _copy_tokenizer(base_model_dir, out_dir / "tokenizer")
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
                            sha256=known_digests.get(str(p.relative_to(out_dir))) or file_sha256(p))
                  for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != "manifest.json")
    extra["timings"] = {k: round(v, 3) for k, v in timings.items()}
    cfg = plan.config
    manifest = Manifest(
        artifact_id=plan.artifact_id,
        compiler_version=COMPILER_VERSION,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        base_model=BaseModelInfo(source=base_source or str(base_model_dir), fingerprint=plan.base_fingerprint,
                                 architecture=cfg.architecture, config=cfg.to_dict()),
        options=opts.to_dict(),
        graph=graph,
        adapters=tuple(entries),
        tokenizer_dir="tokenizer",
        chat_template=chat_template,
        generation_config=generation_config,
        files=files,
        specializations=specs,
        extra=extra,
    )
    manifest.save(out_dir / "manifest.json")
    timings["write"] = time.perf_counter() - t0
    report("write", 1.0, f"manifest written with {len(files)} files ({timings['write']:.1f}s)")
    return manifest


def _bank_feeds(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from loraflow import graph_contract as gc

    feeds = {}
    for m in banks_a:
        feeds[gc.lora_a(m)] = banks_a[m]
        feeds[gc.lora_b(m)] = banks_b[m]
    return feeds


def _verify_ort(onnx_path: Path, decoder, graph, bank_feeds, opts: CompileOptions, num_adapters: int):
    import onnxruntime as ort

    from services.compiler.verify import verify_graph

    feeds, occupied = _verification_banks(bank_feeds, num_adapters)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    chunk = max(1, min(int(opts.prefill_seq_len), 4))
    return verify_graph(session, decoder, graph, feeds, dtype=opts.dtype, occupied_slots=occupied, chunk=chunk,
                        ctx_len=min(int(opts.ctx_len), 64))


def _uses_fused_graph(plan: ArtifactPlan) -> bool:
    """fp32/int8/int4 get the fused graph where it can express the model; fp16 (GPU) keeps the trace."""
    from services.compiler.fused.builder import WEIGHT_BITS, fused_graph_supported

    return plan.options.dtype in WEIGHT_BITS and fused_graph_supported(plan.config) is None


def _verification_banks(bank_feeds: dict[str, np.ndarray], num_adapters: int) -> tuple[dict[str, np.ndarray], int]:
    """(banks, occupied slots): with no adapter yet, a random slot 1 exercises the LoRA path anyway."""
    feeds = dict(bank_feeds)
    if num_adapters:
        return feeds, num_adapters
    rng = np.random.default_rng(0)
    for name, bank in feeds.items():
        bank = bank.copy()
        bank[:, 1] = rng.normal(0, 0.05, bank[:, 1].shape)
        feeds[name] = bank
    return feeds, 1


def _verify_fused(out_dir: Path, decoder, dequantized, graph, bank_feeds, opts: CompileOptions, num_adapters: int):
    """Reports for graph.file and, when the artifact has one, graph.native_file (None otherwise): each
    runs through the runtime's step driver against the PyTorch reference."""
    import onnxruntime as ort

    from loraflow import native as native_lora
    from services.compiler.fused.builder import dequantized_decoder
    from services.compiler.fused.verify import verify_fused_graph

    feeds, occupied = _verification_banks(bank_feeds, num_adapters)
    quantized = opts.dtype != "fp32"
    reference = dequantized_decoder(decoder, dequantized) if quantized else decoder
    chunk = max(1, min(int(opts.prefill_seq_len), 4))
    reports = []
    for file in (graph.file, graph.native_file):
        if not file:
            reports.append(None)
            continue
        so = ort.SessionOptions()
        if file == graph.native_file:
            native_lora.register(so)
        session = ort.InferenceSession(str(out_dir / file), so, providers=["CPUExecutionProvider"])
        reports.append(verify_fused_graph(session, reference, graph, feeds, ctx_len=int(opts.ctx_len),
                                          occupied_slots=occupied, chunk=chunk,
                                          accuracy_level=opts.quant_accuracy_level,
                                          float_decoder=decoder if quantized else None))
    return reports[0], reports[1]


def _copy_tokenizer(base_model_dir: Path, dst: Path) -> str | None:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = base_model_dir / name
        if src.is_file() or src.is_symlink():
            # A tokenizer file linked to outside the model directory (chat_template.jinja -> a secret) is refused.
            shutil.copyfile(confined_file(base_model_dir, name, field="base_model"), dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied and "vocab.json" not in copied:
        raise InvalidArgument(f"{base_model_dir} has no tokenizer files", field="base_model",
                              value=str(base_model_dir))
    if (dst / "chat_template.jinja").is_file():
        return (dst / "chat_template.jinja").read_text()
    if (dst / "chat_template.json").is_file():
        return json.loads((dst / "chat_template.json").read_text()).get("chat_template")
    if (dst / "tokenizer_config.json").is_file():
        return json.loads((dst / "tokenizer_config.json").read_text()).get("chat_template")
    return None


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
