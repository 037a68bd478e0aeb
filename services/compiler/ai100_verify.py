"""Verify an AI 100 bundle before it is published: its graph on ONNX Runtime, driven like the card.

``OrtRetainedStateSession`` plays the Cloud AI 100 runtime's part over a bundle's ONNX file (the
com.qualcomm.cloud operators run as their function bodies): it accepts only the shapes of the bundle's
specializations (prefill batch_size x prefill_seq_len, decode full_batch_size x 1), keeps the KV cache as
retained state in the custom-IO precision between calls, and honours set_buffers / skip_buffers as
QAICInferenceSession does (tests and the qaicrt stand-in drive whole small bundles with it).

``verify_bundle`` checks a bundle of any size with one layer's weights resident. The inference service's
own scheduler and AI 100 stepper build the calls of a mixed batch, with more requests than KV slots (so
slots are reused) and every adapter slot plus the base model in use; the tokens each request is fed after
its prompt are fixed in advance (seeded), so the calls are known before anything runs. The bundle's graph
is then cut at its residual stream (``hidden.{i}``, see ai100_writer.py) into the embedding, one segment
per layer and the head, every node of the file in a segment, and each segment runs over every call before
the next one opens, its layer's retained KV state carried from call to call exactly as the card carries
it. Each sampled logit row is compared with the layer-by-layer PyTorch reference on the same tokens:

  * at every sampled position the bundle's greedy token (argmax) equals the reference's;
  * the logits are within the tolerance (relative to max(1, max |reference logit|), scaled with the
    reference's own float32 error as services/compiler/verify.py describes).

An fp32 bundle is run twice: as written, and converted to fp16 (weights, compute and KV cache) as
``-convert-to-fp16`` with fp16 custom IO does on the card; an fp16 bundle runs as written. A failure
raises VerificationFailed, so the artifact is not written.
"""

from __future__ import annotations

import gc as garbage
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.ai100_stepper import Ai100Layout, Ai100Stepper
from loraflow.artifact.manifest import GraphSpec
from loraflow.artifact.scheduler import Scheduler
from loraflow.artifact.scheduler import Sequence as Request
from loraflow.errors import FailedPrecondition, InvalidArgument
from services.compiler.ai100 import CUSTOM_IO_FILE, SPECIALIZATIONS_FILE
from services.compiler.ai100_writer import hidden_name
from services.compiler.modeling.layerwise import ReferenceRow
from services.compiler.modeling.weights import EMBED
from services.compiler.options import CompileOptions
from services.compiler.verify import ReferenceFn, VerificationFailed, scaled_tolerance

# Max |ORT - reference| / max(1, max |reference|), before scaling by the model's measured float32 error.
# fp32 differs by summation order only; fp16 is measured on the tiny test models (Llama/Mistral/Qwen2,
# mixed ranks) at about 1e-3 and on a miswired graph at > 0.1, so 2e-2 keeps a margin both ways.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass(frozen=True)
class PrecisionReport:
    precision: str
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    tokens_match: bool
    tokens_checked: int
    calls: int


@dataclass(frozen=True)
class Ai100VerifyReport:
    runs: tuple[PrecisionReport, ...]
    requests: int
    slots: int
    lora_ids: tuple[int, ...]
    reference_error: float = 0.0  # the reference's own float32 error, which the tolerances follow

    @property
    def max_abs_diff(self) -> float:
        return self.runs[0].max_abs_diff

    def to_dict(self) -> dict:
        fp32 = self.runs[0]
        return {"max_abs_diff": fp32.max_abs_diff, "relative_diff": fp32.relative_diff, "tolerance": fp32.tolerance,
                "tokens_match": all(r.tokens_match for r in self.runs), "driver": "ai100-retained-state-on-ort-by-layer",
                "requests": self.requests, "slots": self.slots, "lora_ids": list(self.lora_ids),
                "reference_fp32_error": self.reference_error, "runs": [asdict(r) for r in self.runs]}


def read_custom_io(path: Path) -> dict[str, str]:
    """IOName -> Precision from a QEfficient custom_io.yaml (the two-key list write_custom_io writes)."""
    io, name = {}, None
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("- ").strip()
        if line.startswith("IOName:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Precision:") and name is not None:
            io[name] = line.split(":", 1)[1].strip()
            name = None
    return io


def read_specializations(path: Path) -> list[dict[str, int]]:
    import json

    return [{k: int(v) for k, v in s.items()} for s in json.loads(path.read_text())["specializations"]]


def to_fp16(model: onnx.ModelProto, keep: Sequence[str]) -> onnx.ModelProto:
    """Weights and compute in fp16, as -convert-to-fp16 does; ``keep`` IO stays float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=list(keep), disable_shape_infer=True)


class OrtRetainedStateSession:
    """The AI 100 runtime's part on ONNX Runtime: specializations, retained state, set/skip buffers."""

    def __init__(self, model: onnx.ModelProto | str | Path, specializations: Sequence[Mapping[str, int]],
                 kv_dtype: str = "float32"):
        import onnxruntime as ort

        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.specs = [dict(s) for s in specializations]
        self.kv_dtype = np.dtype(kv_dtype)
        self.retained_names = [n for n in self.output_names if n.endswith("_RetainedState")]
        past = self.session.get_inputs()
        self._past_shapes = {i.name: i.shape for i in past if i.name.startswith("past_")}
        self._buffers: dict[str, np.ndarray] = {}
        self._skipped: set[str] = set()
        self._state: dict[str, np.ndarray] = {}
        self.calls = 0

    def _dims(self, spec: Mapping[str, int], shape) -> tuple[int, ...]:
        return tuple(spec[d] if isinstance(d, str) else int(d) for d in shape)

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        for name, buf in buffers.items():
            if name not in self.input_names and name not in self.output_names:
                raise KeyError(f"no binding {name!r}")
            self._buffers[name] = np.array(buf, copy=True)  # the card copies at set time too
            self._skipped.discard(name)

    def skip_buffers(self, names: Sequence[str]) -> None:
        for name in names:
            self._buffers.pop(name, None)
            self._skipped.add(name)

    def _match(self, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        ids = inputs[gc.INPUT_IDS].shape
        for spec in self.specs:
            if (spec["batch_size"], spec["seq_len"]) == tuple(ids):
                return spec
        raise FailedPrecondition(f"input_ids shape {list(ids)} matches no specialization {self.specs}",
                                 field="input_ids", value=list(ids))

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = self._match(inputs)
        feeds = {**self._buffers, **inputs}
        for name, shape in self._past_shapes.items():
            if name in self._skipped:  # retained: what the last call left (zeros at activation)
                dims = self._dims(spec, shape)
                if name not in self._state:
                    self._state[name] = np.zeros(dims, self.kv_dtype)
                feeds[name] = self._state[name]
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise FailedPrecondition(f"no buffer for inputs {missing}", field="inputs", value=missing)
        outs = dict(zip(self.output_names, self.session.run(None, {n: feeds[n] for n in self.input_names}),
                        strict=True))
        self.calls += 1
        for name in self.retained_names:
            self._state[name.removesuffix("_RetainedState")] = outs[name].astype(self.kv_dtype)
        return {n: v for n, v in outs.items() if n not in self._skipped}

    def close(self) -> None:
        del self.session


# --- one layer at a time -------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A piece of the bundle graph: the nodes that compute ``outputs`` from the graph's inputs and the
    residual stream ``hidden`` (None for the embedding)."""

    name: str
    model: onnx.ModelProto  # initializers refer to the bundle's data file
    hidden: str | None
    outputs: tuple[str, ...]
    nodes: frozenset[str]


def split_layers(model: onnx.ModelProto, num_layers: int) -> list[Segment]:
    """The embedding, each layer and the head of a bundle graph (loaded without its data). Every node of the
    graph lies in some segment (the prologue's RoPE and mask nodes in each layer that uses them); a graph
    that does not split so is refused, since part of it would go unverified."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    inputs = {i.name: i for i in graph.input}
    inits = {t.name for t in graph.initializer}
    outputs = {o.name: o for o in graph.output}
    embed = next(t for t in graph.initializer if t.name == EMBED)
    hidden_type = embed.data_type
    hidden_size = int(embed.dims[1])
    cuts = [("embed", None, (hidden_name(0),))]
    cuts += [(f"layer {i}", hidden_name(i), (hidden_name(i + 1), gc.retained_key(i), gc.retained_value(i)))
             for i in range(num_layers)]
    cuts.append(("head", hidden_name(num_layers), (gc.LOGITS,)))
    segments, covered = [], set()
    for name, hidden, outs in cuts:
        if any(o not in producer for o in outs) or (hidden is not None and hidden not in producer):
            raise InvalidArgument(f"the bundle graph has no {hidden or outs[0]!r}: it cannot be verified a layer at "
                                  "a time", field="graph", value=hidden or outs[0])
        stop = set(inputs) | inits | ({hidden} if hidden else set())
        picked, todo = set(), list(outs)
        while todo:
            tensor = todo.pop()
            if tensor in stop or not tensor:
                continue
            node = producer[tensor]
            if node.name not in picked:
                picked.add(node.name)
                todo.extend(node.input)
        nodes = [n for n in graph.node if n.name in picked]  # the file's own (topological) order
        used = {i for n in nodes for i in n.input}
        seg_inputs = [inputs[i] for i in inputs if i in used]
        if hidden:
            seg_inputs.append(helper.make_tensor_value_info(hidden, hidden_type, ["batch_size", "seq_len",
                                                                                   hidden_size]))
        seg_outputs = [outputs[o] if o in outputs else
                       helper.make_tensor_value_info(o, hidden_type, ["batch_size", "seq_len", hidden_size])
                       for o in outs]
        seg = helper.make_graph(nodes, f"{graph.name}/{name}", seg_inputs, seg_outputs,
                                [t for t in graph.initializer if t.name in used])
        seg_model = helper.make_model(seg, opset_imports=list(model.opset_import), producer_name="loraflow-verify")
        seg_model.ir_version = model.ir_version
        seg_model.functions.extend(f for f in model.functions if f.name in {n.op_type for n in nodes})
        segments.append(Segment(name=name, model=seg_model, hidden=hidden, outputs=outs, nodes=frozenset(picked)))
        covered |= picked
    missed = [n.name for n in graph.node if n.name not in covered]
    if missed:
        raise InvalidArgument(f"{len(missed)} nodes of the bundle graph feed no output (first {missed[0]!r}); "
                              "they would go unverified", field="graph", value=missed[0])
    return segments


@dataclass(frozen=True)
class Call:
    """One call the scheduler and stepper made: its inputs, and (request, token index, row) per sampled row."""

    inputs: dict[str, np.ndarray]
    sampled: tuple[tuple[int, int, int], ...]


class _NoDevice:
    """What Ai100Stepper needs of a session to build feeds (the calls are recorded, run later)."""

    def __init__(self, graph: GraphSpec):
        self.input_names = [t.name for t in graph.inputs]
        self.output_names = [t.name for t in graph.outputs]

    def skip_buffers(self, names: Sequence[str]) -> None:
        del names


def record_calls(layout: Ai100Layout, graph: GraphSpec, prompts: Sequence[Sequence[int]], lora_ids: Sequence[int],
                 fed: Sequence[Sequence[int]]) -> list[Call]:
    """The calls serving ``prompts`` makes through the scheduler and the AI 100 stepper when request i's
    generated tokens are ``fed[i]`` (len(fed[i]) new tokens each)."""
    stepper = Ai100Stepper(_NoDevice(graph), layout, graph.layers, graph.vocab_size)
    sched = Scheduler(full_batch_size=layout.cache_rows, prefill_seq_len=layout.prefill_seq_len,
                      ctx_len=layout.ctx_len, max_waiting=len(prompts), max_prefill_rows=layout.batch_size)
    seqs = [Request(request_id=str(i), prompt_ids=list(p), lora_id=int(lora_ids[i]), max_new_tokens=len(fed[i]),
                    ignore_eos=True) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    calls = []
    # Stop flag: at most one call per token fed, plus one per prefill chunk.
    for _ in range(sum(len(p) + len(f) for p, f in zip(prompts, fed, strict=True)) + 1):
        step = sched.schedule()
        if step is None:
            break
        inputs, where = stepper.feeds(step)
        sampled, picks = [], {}
        for row, at in zip(step.rows, where, strict=True):
            if row.samples:
                i = int(row.request_id)
                k = len(seqs[i].output_ids) + sum(1 for r, _, _ in sampled if r == i)
                sampled.append((i, k, at))
                picks[row.request_id] = int(fed[i][k])
        calls.append(Call(inputs={k: v.copy() for k, v in inputs.items()}, sampled=tuple(sampled)))
        sched.update(step, picks)
    if any(len(s.output_ids) != len(f) for s, f in zip(seqs, fed, strict=True)):
        raise VerificationFailed("the scheduler did not finish the verification requests", float("inf"))
    return calls


def _segment_session(seg: Segment, bundle_dir: Path, fp16: bool, keep: Sequence[str]):
    """A session over one segment: as written (its initializers mapped from the bundle's data file), or
    converted to fp16 with ``keep`` IO left float32."""
    import onnxruntime as ort
    from onnx.external_data_helper import load_external_data_for_tensor

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    model = seg.model
    if fp16:
        model = onnx.ModelProto()
        model.CopyFrom(seg.model)
        for t in model.graph.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                load_external_data_for_tensor(t, str(bundle_dir))
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]
        model = to_fp16(model, [n for n in keep if n in {*(i.name for i in model.graph.input),
                                                         *(o.name for o in model.graph.output)}])
    else:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(bundle_dir))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def replay(segments: Sequence[Segment], calls: Sequence[Call], banks: Mapping[str, np.ndarray],
           specs: Sequence[Mapping[str, int]], bundle_dir: Path, *, fp16: bool, keep: Sequence[str]
           ) -> list[np.ndarray]:
    """Logits [rows, 1, V] of every call, one segment (one layer's weights) resident at a time."""
    shapes = {(s["batch_size"], s["seq_len"]) for s in specs}
    for call in calls:
        if tuple(call.inputs[gc.INPUT_IDS].shape) not in shapes:
            raise FailedPrecondition(f"input_ids shape {list(call.inputs[gc.INPUT_IDS].shape)} matches no "
                                     f"specialization {list(specs)}", field="input_ids",
                                     value=list(call.inputs[gc.INPUT_IDS].shape))
    cache_rows = specs[0].get("full_batch_size", specs[0]["batch_size"])
    hidden: list[np.ndarray | None] = [None] * len(calls)
    logits: list[np.ndarray] = []
    for seg in segments:
        session = _segment_session(seg, bundle_dir, fp16, keep)
        try:
            names = {i.name: i for i in session.get_inputs()}
            out_names = {o.name for o in session.get_outputs()}
            state: dict[str, np.ndarray] = {}  # this segment's layer: retained from call to call
            other: dict[str, np.ndarray] = {}  # another layer's cache, of which the prologue reads only the shape
            for name, info in names.items():
                if name.startswith("past_"):  # retained state: zeros when the program is activated
                    dtype = np.float16 if "float16" in info.type else np.float32
                    zeros = np.zeros((cache_rows, *info.shape[1:2], specs[0]["ctx_len"], *info.shape[3:]), dtype)
                    (state if f"{name}_RetainedState" in out_names else other)[name] = zeros
            for c, call in enumerate(calls):
                feeds = {n: call.inputs[n] for n in names if n in call.inputs}
                feeds |= {n: np.asarray(banks[n], np.float32) for n in names if n in banks}
                feeds |= state | other
                if seg.hidden is not None:
                    feeds[seg.hidden] = hidden[c]
                out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
                for name in list(state):
                    state[name] = out[f"{name}_RetainedState"]
                if seg.hidden is None or seg.outputs[0] != gc.LOGITS:
                    hidden[c] = out[seg.outputs[0]]
                else:
                    logits.append(out[gc.LOGITS].astype(np.float32))
        finally:
            del session
            garbage.collect()
    return logits


def verify_bundle(bundle_dir: Path, graph: GraphSpec, reference: ReferenceFn, banks: Mapping[str, np.ndarray],
                  options: CompileOptions, *, occupied_slots: int, decode_steps: int = 3, seed: int = 0,
                  precisions: Sequence[str] | None = None) -> Ai100VerifyReport:
    """Run the bundle in ``bundle_dir`` a layer at a time as the card would and compare it with ``reference``
    (the float32 model, layer by layer). ``precisions``: default ("fp32", "fp16") for an fp32 bundle,
    ("fp16",) for an fp16 one."""
    bundle_dir = Path(bundle_dir)
    weights_dtype = options.dtype or "fp32"
    precisions = tuple(precisions or (("fp32", "fp16") if weights_dtype == "fp32" else ("fp16",)))
    if weights_dtype == "fp16" and "fp32" in precisions:
        raise InvalidArgument("an fp16 bundle has no fp32 run", field="precisions", value=list(precisions))
    specs = read_specializations(bundle_dir / SPECIALIZATIONS_FILE)
    # Verification shapes: the bundle's own specializations, ctx_len cut to what the check uses.
    layout = Ai100Layout.from_options(options.to_dict())
    rng = np.random.default_rng(seed)
    chunk = layout.prefill_seq_len
    ctx = min(layout.ctx_len, max(8, 2 * chunk + decode_steps + 4))
    layout = Ai100Layout(batch_size=layout.batch_size, full_batch_size=layout.full_batch_size,
                         prefill_seq_len=chunk, ctx_len=ctx, continuous_batching=layout.continuous_batching)
    specs = [{**s, "ctx_len": ctx} for s in specs]
    n_req = layout.cache_rows + 1  # one more than the slots: a finished request's slot is reused
    lengths = [max(1, min(ctx - decode_steps - 1, n)) for n in (2 * chunk + 1, 1, chunk, 3, chunk + 2, 2)]
    prompts = [rng.integers(0, graph.vocab_size, lengths[i % len(lengths)]).tolist() for i in range(n_req)]
    lora_ids = [i % (occupied_slots + 1) for i in range(n_req)]  # the base model and every adapter
    max_new = [decode_steps - (i % 2) for i in range(n_req)]  # rows finish at different steps
    fed = [rng.integers(0, graph.vocab_size, n).tolist() for n in max_new]  # the tokens each request is fed
    calls = record_calls(layout, graph, prompts, lora_ids, fed)
    segments = split_layers(onnx.load(str(bundle_dir / graph.file), load_external_data=False), graph.layers)
    ref = reference([ReferenceRow(tuple(p + f[:-1]), lora) for p, f, lora in zip(prompts, fed, lora_ids, strict=True)])
    # -convert-to-fp16 makes every tensor fp16 except the IO custom_io.yaml keeps: the KV cache travels in its
    # precision there (fp16; mxint8 is not emulated and is checked as fp16).
    kv_precision = next(iter(read_custom_io(bundle_dir / CUSTOM_IO_FILE).values()), "float16")
    keep = [n for n in [*(s.name for s in graph.inputs), *(s.name for s in graph.outputs)]
            if not n.startswith("past_") or kv_precision == "float32"]
    runs = []
    for precision in precisions:
        fp16 = precision == "fp16"
        got = replay(segments, calls, banks, specs, bundle_dir, fp16=fp16 and weights_dtype == "fp32", keep=keep)
        worst, scale, match, checked = 0.0, 1.0, True, 0
        for call, logits in zip(calls, got, strict=True):
            for i, k, row in call.sampled:
                row_logits = logits[row, -1]
                ref_row = ref.logits[i][len(prompts[i]) - 1 + k]
                if not np.isfinite(row_logits).all():
                    raise VerificationFailed(f"{precision}: request {i} token {k}: non-finite logits", float("inf"))
                worst = max(worst, float(np.abs(row_logits - ref_row).max()))
                scale = max(scale, float(np.abs(ref_row).max()))
                match &= int(np.argmax(ref_row)) == int(np.argmax(row_logits))
                checked += 1
        tol = scaled_tolerance(TOLERANCE[precision], ref.error, fp16=fp16)
        report = PrecisionReport(precision=precision, max_abs_diff=worst, relative_diff=worst / scale, tolerance=tol,
                                 tokens_match=bool(match), tokens_checked=checked, calls=len(calls))
        if worst / scale > tol:
            raise VerificationFailed(f"AI 100 graph ({precision}) differs from the PyTorch reference: max abs diff "
                                     f"{worst:.6g} (relative {worst / scale:.3g} > tolerance {tol:g})", worst)
        if not match:
            raise VerificationFailed(f"AI 100 graph ({precision}): greedy tokens differ from the PyTorch "
                                     f"reference (max abs diff {worst:.6g})", worst)
        runs.append(report)
    return Ai100VerifyReport(runs=tuple(runs), requests=n_req, slots=layout.cache_rows, lora_ids=tuple(lora_ids),
                             reference_error=ref.error)
