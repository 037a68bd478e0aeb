"""Verify an AI 100 bundle before it is published: its graph on ONNX Runtime, driven like the card.

``OrtRetainedStateSession`` plays the Cloud AI 100 runtime's part over the bundle's own ONNX file
(the com.qualcomm.cloud operators run as their function bodies): it accepts only the shapes of the
bundle's specializations (prefill batch_size x prefill_seq_len, decode full_batch_size x 1), keeps
the KV cache as retained state in the custom-IO precision (fp16) between calls, and honours
set_buffers / skip_buffers as QAICInferenceSession does. ``verify_bundle`` serves a mixed batch
through the inference service's own scheduler and AI 100 stepper on it, greedy, with more requests
than KV slots (so slots are reused) and every adapter slot plus the base model in use, and checks
each row against the float32 PyTorch decoder on the same tokens:

  * every greedy token equals the reference's argmax at that position;
  * the logits are within TOLERANCE (relative to max(1, max |reference logit|)).

Twice: the fp32 graph, and the same graph with weights, compute and KV cache converted to fp16 as
``-convert-to-fp16`` with fp16 custom IO does on the card. A failure raises VerificationFailed, so
the artifact is not written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from loraflow import graph_contract as gc
from loraflow.errors import FailedPrecondition
from loraflow.manifest import GraphSpec
from services.compiler.ai100 import CUSTOM_IO_FILE, SPECIALIZATIONS_FILE
from services.compiler.modeling.decoder import MultiLoraDecoder
from services.compiler.options import CompileOptions
from services.compiler.verify import VerificationFailed
from services.inference.ai100_runtime import Ai100Layout, Ai100Stepper
from services.inference.scheduler import Scheduler
from services.inference.scheduler import Sequence as Request

# Max |ORT - reference| / max(1, max |reference|). fp32 differs by summation order only; fp16 is
# measured on the tiny test models (Llama/Mistral/Qwen2, mixed ranks) at about 1e-3 and on a
# miswired graph at > 0.1, so 2e-2 keeps a margin both ways.
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

    @property
    def max_abs_diff(self) -> float:
        return self.runs[0].max_abs_diff

    def to_dict(self) -> dict:
        fp32 = self.runs[0]
        return {"max_abs_diff": fp32.max_abs_diff, "relative_diff": fp32.relative_diff, "tolerance": fp32.tolerance,
                "tokens_match": all(r.tokens_match for r in self.runs), "driver": "ai100-retained-state-on-ort",
                "requests": self.requests, "slots": self.slots, "lora_ids": list(self.lora_ids),
                "runs": [asdict(r) for r in self.runs]}


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


def _reference_logits(decoder: MultiLoraDecoder, tokens: Sequence[int], lora_id: int,
                      banks: Mapping[str, np.ndarray]) -> np.ndarray:
    """[T, V] float32 logits of the PyTorch decoder over ``tokens`` with adapter slot ``lora_id``."""
    with torch.no_grad():
        pk, pv = decoder.empty_cache(1)
        lora_a = {m: torch.from_numpy(np.asarray(banks[gc.lora_a(m)], np.float32)) for m in decoder.lora_modules}
        lora_b = {m: torch.from_numpy(np.asarray(banks[gc.lora_b(m)], np.float32)) for m in decoder.lora_modules}
        logits, _, _ = decoder(torch.tensor([list(tokens)]), torch.arange(len(tokens)).view(1, -1),
                               torch.tensor([[lora_id]]), torch.tensor([[0]]), pk, pv, lora_a, lora_b,
                               all_logits=True)
    return logits[0].float().numpy()


def drive(session, layout: Ai100Layout, num_layers: int, vocab_size: int, banks: Mapping[str, np.ndarray],
          prompts: Sequence[Sequence[int]], lora_ids: Sequence[int], max_new: Sequence[int]
          ) -> tuple[list[list[int]], list[list[np.ndarray]]]:
    """Greedy-serve ``prompts`` through the scheduler and the AI 100 stepper; (tokens, logits per token)."""
    stepper = Ai100Stepper(session, layout, num_layers, vocab_size)
    session.set_buffers(dict(banks))
    sched = Scheduler(full_batch_size=layout.cache_rows, prefill_seq_len=layout.prefill_seq_len,
                      ctx_len=layout.ctx_len, max_waiting=len(prompts), max_prefill_rows=layout.batch_size)
    seqs = [Request(request_id=str(i), prompt_ids=list(p), lora_id=int(lora_ids[i]), max_new_tokens=int(max_new[i]),
                    ignore_eos=True) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    logits_per: list[list[np.ndarray]] = [[] for _ in prompts]
    # Stop flag: at most one call per token fed, plus one per prefill chunk.
    for _ in range(sum(len(p) + m for p, m in zip(prompts, max_new, strict=True)) + 1):
        step = sched.schedule()
        if step is None:
            break
        logits = stepper.execute(step)
        sampled = {}
        for row, row_logits in zip(step.rows, logits, strict=True):
            if row.samples:
                sampled[row.request_id] = int(np.argmax(row_logits))
                logits_per[int(row.request_id)].append(row_logits.copy())
        sched.update(step, sampled)
    return [s.output_ids for s in seqs], logits_per


def verify_bundle(bundle_dir: Path, graph: GraphSpec, decoder: MultiLoraDecoder, banks: Mapping[str, np.ndarray],
                  options: CompileOptions, *, occupied_slots: int, decode_steps: int = 3, seed: int = 0,
                  precisions: Sequence[str] = ("fp32", "fp16")) -> Ai100VerifyReport:
    """Run the bundle in ``bundle_dir`` as the card would and compare it with ``decoder`` (fp32)."""
    bundle_dir = Path(bundle_dir)
    specs = read_specializations(bundle_dir / SPECIALIZATIONS_FILE)
    kv_precision = next(iter(read_custom_io(bundle_dir / CUSTOM_IO_FILE).values()), "float16")
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
    float_banks = {k: np.asarray(v, np.float32) for k, v in banks.items()}
    runs = []
    model = onnx.load(str(bundle_dir / graph.file))
    for precision in precisions:
        if precision == "fp32":
            session = OrtRetainedStateSession(model, specs, "float32")
        else:
            keep = [n for n in [*(s.name for s in graph.inputs), *(s.name for s in graph.outputs)]
                    if not n.startswith("past_")]
            # mxint8 KV is not emulated: it is checked as fp16, its nearest ONNX precision.
            dtype = "float16" if kv_precision in ("float16", "mxint8") else "float32"
            session = OrtRetainedStateSession(to_fp16(model, keep), specs, dtype)
        tokens, got = drive(session, layout, graph.layers, graph.vocab_size, float_banks, prompts, lora_ids, max_new)
        worst, scale, match, checked = 0.0, 1.0, True, 0
        for i, prompt in enumerate(prompts):
            if len(tokens[i]) != max_new[i]:
                raise VerificationFailed(f"request {i} produced {len(tokens[i])} tokens, expected {max_new[i]}",
                                         float("inf"))
            ref = _reference_logits(decoder, prompt + tokens[i][:-1], lora_ids[i], float_banks)
            for k, tok in enumerate(tokens[i]):
                ref_row = ref[len(prompt) - 1 + k]
                if not np.isfinite(got[i][k]).all():
                    raise VerificationFailed(f"{precision}: request {i} token {k}: non-finite logits", float("inf"))
                worst = max(worst, float(np.abs(got[i][k] - ref_row).max()))
                scale = max(scale, float(np.abs(ref_row).max()))
                match &= int(np.argmax(ref_row)) == tok
                checked += 1
        tol = TOLERANCE[precision]
        report = PrecisionReport(precision=precision, max_abs_diff=worst, relative_diff=worst / scale, tolerance=tol,
                                 tokens_match=bool(match), tokens_checked=checked, calls=session.calls)
        session.close()
        if worst / scale > tol:
            raise VerificationFailed(f"AI 100 graph ({precision}) differs from the PyTorch reference: max abs diff "
                                     f"{worst:.6g} (relative {worst / scale:.3g} > tolerance {tol:g})", worst)
        if not match:
            raise VerificationFailed(f"AI 100 graph ({precision}): greedy tokens differ from the PyTorch "
                                     f"reference (max abs diff {worst:.6g})", worst)
        runs.append(report)
    return Ai100VerifyReport(runs=tuple(runs), requests=n_req, slots=layout.cache_rows, lora_ids=tuple(lora_ids))
