"""A fused graph verified a layer range at a time, so a session never holds more than a range's weights.

An fp32 artifact's whole-graph session makes every weight page resident (the mapped data file plus the
kernels' pre-packed copies: 4.6 GiB at Llama-3.2-1B's shape, more than the compile itself needs). Here:

1. **Record.** The scenario (services/compiler/verify.py ``drive_scenario``, with fed decode tokens so every
   call is known in advance) runs through the runtime's own ``FusedStepDriver`` over a ``Recorder``: a
   stand-in session that keeps what the driver binds for each call (input_ids, lora_ids, seqlens_k,
   total_sequence_length, logits_index, and the KV slot range it binds as past and present) and hands back
   placeholder logits that name their call and row.
2. **Split.** ``split_ranges`` cuts the graph file (loaded without its data) at the residual stream between
   layers: a range's graph holds the nodes of its layers (the first range also the embedding, the last the
   head, every range the few prologue nodes it reads, e.g. ``lora_ids`` flattened), reads the stream tensors
   the previous layers produced and writes those the next layers read, and maps its initializers from the
   artifact's own data file. Every node of the file must lie in some range, and no range may reach into
   another's layers, or the graph is refused (part of it would go unverified).
3. **Replay.** Each range's session is opened, runs every recorded call in order (its layers' KV cache
   bound as past and present, the same memory, as the driver binds it; the stream tensors from the range
   before), and is closed before the next opens; the last range's logits then replace the placeholders.
   The artifact's two graphs (model.onnx, model.native.onnx) replay range by range side by side, so the
   second reads its range's weights while they are still in the page cache.
4. **Compare.** The second graph may replay a prefix of the calls (fused/verify.py: the scenario's first part);
   after each range ``compare_replays`` holds what it hands the next range for each of those calls, and its
   KV cache after them, to the first graph's.

The graph computes exactly the nodes and edges of the file: only the edges at the cuts pass through numpy
(float32, unchanged), so a miswiring anywhere is caught as it would be in one session.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
from onnx import TensorProto, helper

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.kv_cache import SharedKvCache
from loraflow.errors import InvalidArgument

# Weight bytes (the initializers the layers read, as stored) a range may hold. A range's session costs that in
# mapped file pages while open, and about as much again for int4/int8 (the kernels' pre-packed blocks; fp32
# range sessions skip pre-packing, fused/verify.py).
RANGE_BYTES = 384 << 20
_LAYER = re.compile(r"^layers\.(\d+)/")


def node_layer(name: str) -> int | None:
    """The layer a node of the fused graph belongs to (builder.py names them ``layers.{i}/...``); None for the
    prologue (embedding, lora_ids) and the head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def _initializer_bytes(t: TensorProto) -> int:
    if t.data_location == TensorProto.EXTERNAL:
        return int({e.key: e.value for e in t.external_data}.get("length", 0))
    return len(t.raw_data) or t.ByteSize()


def layer_ranges(model: onnx.ModelProto, num_layers: int, max_bytes: int = RANGE_BYTES) -> list[tuple[int, int]]:
    """[first, stop) layer ranges in order, each holding at most ``max_bytes`` of its layers' initializers (at
    least one layer). The initializers only prologue and head nodes read count toward the last range, which
    holds the head (a tied fp32 head multiplies by the embedding table; an untied embedding is only gathered
    from, so counting it errs on the small side)."""
    if max_bytes < 1:
        raise InvalidArgument(f"range_bytes must be positive, got {max_bytes}", field="range_bytes", value=max_bytes)
    sizes = {t.name: _initializer_bytes(t) for t in model.graph.initializer}
    per_layer = [0] * num_layers
    counted: set[str] = set()
    for node in model.graph.node:
        i = node_layer(node.name)
        if i is None:
            continue
        for name in node.input:
            if name in sizes and name not in counted:
                counted.add(name)
                per_layer[i] += sizes[name]
    tail = sum(size for name, size in sizes.items() if name not in counted)
    ranges, stop, held = [], num_layers, tail
    for i in reversed(range(num_layers)):  # from the head down: the last range starts with the head's bytes
        if i + 1 < stop and held + per_layer[i] > max_bytes:
            ranges.append((i + 1, stop))
            stop, held = i + 1, 0
        held += per_layer[i]
    ranges.append((0, stop))
    return ranges[::-1]


@dataclass(frozen=True)
class RangeGraph:
    """One layer range of a fused graph: its nodes, the stream tensors it reads and writes."""

    layers: tuple[int, int]  # [first, stop)
    model: onnx.ModelProto  # initializers refer to the artifact's data file
    stream_in: tuple[str, ...]
    stream_out: tuple[str, ...]  # the stream at ``stop``; () for the last range (it writes logits)
    nodes: frozenset[str]

    @property
    def name(self) -> str:
        return f"layers {self.layers[0]}..{self.layers[1] - 1}"


def _stream(graph: onnx.GraphProto, cut: int) -> tuple[str, ...]:
    """Tensors the nodes of layers < ``cut`` produce and a node of a later layer, or the head, reads."""
    layer_of = {out: node_layer(n.name) for n in graph.node for out in n.output if out}
    crossing = []
    for node in graph.node:
        i = node_layer(node.name)
        if i is not None and i < cut:
            continue
        for name in node.input:
            j = layer_of.get(name)
            if j is not None and j < cut and name not in crossing:
                crossing.append(name)
    return tuple(crossing)


def _live(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes some graph output depends on (the rest is dead: ONNX Runtime drops it)."""
    producer = {out: node for node in graph.node for out in node.output if out}
    live, todo = set(), [o.name for o in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node.name not in live:
            live.add(node.name)
            todo.extend(node.input)
    return live


def split_ranges(model: onnx.ModelProto, num_layers: int, ranges: Sequence[tuple[int, int]]) -> list[RangeGraph]:
    """The graph cut into ``ranges`` (contiguous, covering 0..num_layers-1). Refused (InvalidArgument) when a
    node lies in no range or a range would need another range's layer."""
    graph = model.graph
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != num_layers or any(
            a >= b or b != ranges[k + 1][0] for k, (a, b) in enumerate(ranges[:-1])) or ranges[-1][0] >= num_layers:
        raise InvalidArgument(f"layer ranges {list(ranges)} do not cover 0..{num_layers - 1} in order",
                              field="ranges", value=list(ranges))
    producer = {out: node for node in graph.node for out in node.output if out}
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name: o for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    float_t = next(o.type.tensor_type.elem_type for o in graph.output if o.name == gc.LOGITS)
    pieces, covered = [], set()
    streams = {cut: _stream(graph, cut) for cut, _ in ranges[1:]}  # a range's stream out is the next one's in
    for a, b in ranges:
        stream_in, stream_out = streams.get(a, ()), streams.get(b, ())
        wanted = [*(stream_out or (gc.LOGITS,)),
                  *(name for i in range(a, b) for name in (gc.present_key(i), gc.present_value(i)))]
        stop = set(inputs) | set(inits) | set(stream_in)
        picked, todo = set(), list(wanted)
        while todo:
            tensor = todo.pop()
            if not tensor or tensor in stop:
                continue
            node = producer.get(tensor)
            if node is None:
                raise InvalidArgument(f"nothing in the graph produces {tensor!r}: it cannot be verified by layer "
                                      "range", field="graph", value=tensor)
            if node.name in picked:
                continue
            i = node_layer(node.name)
            if i is not None and not a <= i < b:
                raise InvalidArgument(f"layers {a}..{b - 1} read node {node.name!r} of another range through "
                                      f"{tensor!r}: the graph cannot be verified by layer range", field="graph",
                                      value=node.name)
            picked.add(node.name)
            todo.extend(node.input)
        nodes = [n for n in graph.node if n.name in picked]  # the file's own (topological) order
        used = {i for n in nodes for i in n.input}
        range_inputs = [inputs[i] for i in inputs if i in used]
        range_inputs += [helper.make_tensor_value_info(name, float_t, None) for name in stream_in]
        range_outputs = [outputs[o] if o in outputs else helper.make_tensor_value_info(o, float_t, None)
                         for o in wanted]
        piece = helper.make_graph(nodes, f"{graph.name}/layers.{a}-{b - 1}", range_inputs, range_outputs,
                                  [inits[n] for n in inits if n in used])
        piece_model = helper.make_model(piece, opset_imports=list(model.opset_import), producer_name="loraflow-verify")
        piece_model.ir_version = model.ir_version
        pieces.append(RangeGraph(layers=(a, b), model=piece_model, stream_in=stream_in, stream_out=stream_out,
                                 nodes=frozenset(picked)))
        covered |= picked
    live = _live(graph)
    missed = [n.name for n in graph.node if n.name not in covered and n.name in live]
    if missed:
        raise InvalidArgument(f"{len(missed)} nodes of the graph that feed its outputs lie in no layer range (first "
                              f"{missed[0]!r}); they would go unverified", field="graph", value=missed[0])
    return pieces


# --- recording -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    """One call the step driver made: its per-call inputs and the KV slot range it bound."""

    inputs: dict[str, np.ndarray]
    slots: tuple[int, int]  # [lo, hi)
    rows: int


class _Binding:
    def __init__(self):
        self.inputs: dict[str, object] = {}
        self.outputs: dict[str, object] = {}

    def bind_ortvalue_input(self, name, value) -> None:
        self.inputs[name] = value

    def bind_ortvalue_output(self, name, value) -> None:
        self.outputs[name] = value

    def clear_binding_inputs(self) -> None:
        self.inputs.clear()

    def clear_binding_outputs(self) -> None:
        self.outputs.clear()


@dataclass
class Recorder:
    """Stands in for a fused graph's session under FusedStepDriver: each run records the call and writes
    placeholder logits (row r of call c: [c + 1, r + 1, 0, ...]) that ``resolve`` later replaces."""

    graph_inputs: Sequence[onnx.ValueInfoProto]
    cache: SharedKvCache  # the driver's: the bound past views locate the slot range
    bound_once: frozenset[str]  # banks and lora_ranks: the verifier binds them itself
    calls: list[Call] = field(default_factory=list)

    def get_inputs(self):
        return [SimpleNamespace(name=i.name, shape=[d.dim_value if d.HasField("dim_value") else d.dim_param
                                                    for d in i.type.tensor_type.shape.dim])
                for i in self.graph_inputs]

    def io_binding(self) -> _Binding:
        return _Binding()

    def run_with_iobinding(self, binding: _Binding) -> None:
        past = binding.inputs[gc.past_key(0)]
        slot_bytes = self.cache.k[0, 0].nbytes
        lo = (past.data_ptr() - self.cache.k[0].ctypes.data) // slot_bytes
        rows = int(past.shape()[0])
        per_call = {name: value.numpy().copy() for name, value in binding.inputs.items()
                    if not name.startswith("past_") and name not in self.bound_once}
        logits = binding.outputs[gc.LOGITS]
        shape = logits.shape()  # [B, 1, V]
        marks = np.zeros(shape, np.float32)
        marks[:, 0, 0] = len(self.calls) + 1
        marks[:, 0, 1] = np.arange(1, shape[0] + 1)
        logits.update_inplace(marks)
        self.calls.append(Call(inputs=per_call, slots=(int(lo), int(lo) + rows), rows=int(shape[0])))


def resolve(sampled: Sequence[Sequence[tuple[int, np.ndarray]]], logits: Sequence[np.ndarray]
            ) -> list[list[tuple[int, np.ndarray]]]:
    """The recorded (position, placeholder) rows with the replayed logits ([B, 1, V] per call) in place."""
    out = []
    for row in sampled:
        got = []
        for pos, mark in row:
            call, r = int(mark[0]) - 1, int(mark[1]) - 1
            got.append((pos, logits[call][r, 0].astype(np.float32)))
        out.append(got)
    return out


# --- replay ----------------------------------------------------------------------------------------------
class RangeReplay:
    """One graph's range-by-range run: the stream tensors of every call, handed from range to range."""

    def __init__(self, calls: Sequence[Call], banks: Mapping[str, np.ndarray], *, kv_heads: int, ctx_len: int,
                 head_dim: int, slots: int, keep_cache_after: int | None = None):
        self.calls = list(calls)
        self.banks = banks
        self.kv = dict(kv_heads=kv_heads, ctx_len=ctx_len, head_dim=head_dim, slots=slots)
        self.stream: list[dict[str, np.ndarray]] = [{} for _ in self.calls]
        self.logits: list[np.ndarray] = []
        self.sessions = 0
        # The current range's KV cache (k, v: [layers, slots, H, ctx, D]) as it was after call keep_cache_after
        # (0-based), else after the last call: what ``compare_replays`` holds another graph's cache against.
        self.keep_cache_after = keep_cache_after
        self.cache: tuple[np.ndarray, np.ndarray] | None = None

    def run(self, session, piece: RangeGraph) -> None:
        """Every call through ``session`` (``piece``'s graph), in order, its layers' cache carried between calls."""
        import onnxruntime as ort

        a, b = piece.layers
        cache = SharedKvCache(layers=b - a, **self.kv)
        names = {i.name for i in session.get_inputs()}
        binding = session.io_binding()
        kept = []  # OrtValues bound, alive until their run returns
        for name in names:
            if name in self.banks:
                value = ort.OrtValue.ortvalue_from_numpy(self.banks[name])
                kept.append(value)
                binding.bind_ortvalue_input(name, value)
        outs = [*piece.stream_out] or [gc.LOGITS]
        for c, call in enumerate(self.calls):
            lo, hi = call.slots
            small = [(n, ort.OrtValue.ortvalue_from_numpy(v)) for n, v in call.inputs.items() if n in names]
            small += [(n, ort.OrtValue.ortvalue_from_numpy(self.stream[c][n])) for n in piece.stream_in]
            for name, value in small:
                binding.bind_ortvalue_input(name, value)
            binding.clear_binding_outputs()
            for name in outs:  # bound first: copy_outputs_to_cpu returns outputs in binding order
                binding.bind_output(name, "cpu")
            for k, (key, val) in enumerate(cache.views(lo, hi)):
                key_v, val_v = ort.OrtValue.ortvalue_from_numpy(key), ort.OrtValue.ortvalue_from_numpy(val)
                binding.bind_ortvalue_input(gc.past_key(a + k), key_v)
                binding.bind_ortvalue_input(gc.past_value(a + k), val_v)
                binding.bind_ortvalue_output(gc.present_key(a + k), key_v)  # the same memory: updated in place
                binding.bind_ortvalue_output(gc.present_value(a + k), val_v)
                small += [("", key_v), ("", val_v)]
            session.run_with_iobinding(binding)
            got = dict(zip(outs, binding.copy_outputs_to_cpu()[:len(outs)], strict=True))
            if piece.stream_out:
                self.stream[c] = got
            else:
                self.stream[c] = {}
                self.logits.append(got[gc.LOGITS])
            del small
            if c == self.keep_cache_after:
                self.cache = (cache.k.copy(), cache.v.copy())
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        if self.keep_cache_after is None:
            self.cache = (cache.k, cache.v)
        self.sessions += 1


def compare_replays(first: RangeReplay, second: RangeReplay, piece: RangeGraph, *, tolerance: float,
                    label: str) -> float:
    """After both graphs ran ``piece``'s layers: each call ``second`` replayed (a prefix of ``first``'s calls)
    must hand the next range (or return as logits) what ``first`` did for that call, and ``second``'s KV cache
    after its last call must hold what ``first``'s held after that call (``first.keep_cache_after``), within
    ``tolerance`` of max(1, max |first|). Returns the largest such relative difference; VerificationFailed
    (naming ``label``, the layers and the call) above the tolerance."""
    from services.compiler.verify import VerificationFailed

    n = len(second.calls)
    if first.keep_cache_after != n - 1 or not same_calls(first.calls[:n], second.calls):
        raise InvalidArgument(f"{label} did not replay a prefix of the calls its cache was kept for",
                              field="calls", value=n)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    for c in range(n):
        if not piece.stream_out:
            pairs.append((f"the logits of call {c + 1}", first.logits[c], second.logits[c]))
            continue
        # The cut's tensors in the order the next layers read them: the same roles in both graphs, though one may
        # name them after its LoRA kernel (the down projection's sum).
        mine, theirs = list(first.stream[c].items()), [(t, second.stream[c][t]) for t in piece.stream_out]
        if len(mine) != len(theirs) or any(a.shape != b.shape for (_, a), (_, b) in zip(mine, theirs, strict=False)):
            raise VerificationFailed(f"{label} hands {piece.name}'s next range other tensors than the other graph "
                                     f"({piece.stream_out} against {[n for n, _ in mine]})", float("inf"))
        pairs += [(f"{name} of call {c + 1}", a, b) for (_, a), (name, b) in zip(mine, theirs, strict=True)]
    assert first.cache is not None and second.cache is not None
    pairs += [(f"the KV cache ({kind}) after call {n}", a, b)
              for kind, a, b in zip("kv", first.cache, second.cache, strict=True)]
    worst = 0.0
    for what, want, got in pairs:
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        diff = float(np.abs(got - want).max()) / scale if want.size else 0.0
        if not np.isfinite(got).all() or not diff <= tolerance:
            raise VerificationFailed(f"{label} differs from the other graph in {piece.name}: {what} by {diff:.3g} "
                                     f"(relative; tolerance {tolerance:g})", diff * scale)
        worst = max(worst, diff)
    return worst


def same_calls(a: Sequence[Call], b: Sequence[Call]) -> bool:
    """Whether two recordings made the same calls: the same slot ranges and per-call inputs, value for value."""
    return len(a) == len(b) and all(
        x.slots == y.slots and x.rows == y.rows and x.inputs.keys() == y.inputs.keys()
        and all(np.array_equal(x.inputs[k], y.inputs[k]) for k in x.inputs) for x, y in zip(a, b, strict=True))


def open_range(piece: RangeGraph, artifact_dir: Path, session_options):
    """A session over one range, its initializers mapped from the artifact's data file."""
    import onnxruntime as ort

    session_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(artifact_dir))
    return ort.InferenceSession(piece.model.SerializeToString(), session_options, providers=["CPUExecutionProvider"])
