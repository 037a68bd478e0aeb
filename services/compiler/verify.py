"""Verify an exported graph: ONNX Runtime vs the PyTorch decoder on a prefill plus decode steps.

Both run in lock-step from one driver that plays the runtime's part of graph_contract.py: a
time-major cache [ctx, F, H, D] per layer, sliced to the first P positions in use, rows in
shuffled KV slots, chunked prefill with right padding, mixed adapters (slot 0 = base) per row.
Every call's logits must agree within the dtype's tolerance, or VerificationFailed says by how much.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraflow import graph_contract as gc
from loraflow.errors import LoraflowError
from loraflow.manifest import GraphSpec
from services.compiler.export import OrtGraph
from services.compiler.modeling.decoder import MultiLoraDecoder

# Max |ORT - reference| allowed, as a fraction of max(1, max |reference logit|). int8 is per-tensor
# dynamic quantisation and only approximates the model: SmolLM2-135M measures 0.22 (lm_head kept
# float), while a miswired graph measures > 1, so 0.3 still catches broken exports.
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2, "int8": 0.3}

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


class VerificationFailed(LoraflowError):
    """The exported graph disagrees with the PyTorch reference."""

    default_reason = "VERIFICATION_FAILED"

    def __init__(self, message: str, max_abs_diff: float):
        super().__init__(message, metadata={"max_abs_diff": f"{max_abs_diff:.6g}"})
        self.max_abs_diff = max_abs_diff


@dataclass(frozen=True)
class VerifyReport:
    max_abs_diff: float
    relative_diff: float
    tolerance: float
    calls: int
    tokens_match: bool


def torch_runner(decoder: MultiLoraDecoder, graph: GraphSpec) -> Runner:
    """Run the PyTorch decoder with ONNX-style feeds (same flat order as the export)."""
    wrapper = OrtGraph(decoder).eval()
    names = [s.name for s in graph.inputs]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            outs = wrapper(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])
        return [o.numpy() for o in outs]

    return run


def ort_runner(session) -> Runner:
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(None, feeds)

    return run


def drive(runners: Sequence[Runner], graph: GraphSpec, banks: Mapping[str, np.ndarray],
          prompts: Sequence[Sequence[int]], lora_ids: Sequence[int], *, chunk: int, decode_steps: int,
          ctx_len: int, full_batch: int, kv_slots: Sequence[int] | None = None
          ) -> tuple[list[np.ndarray], list[list[int]], int]:
    """Prefill ``prompts`` in chunks, then greedy-decode ``decode_steps`` tokens; runners[0] picks them.

    Returns (per runner: [B, V] logits of each row's last fed token, generated tokens per row,
    number of calls). Every generated token is fed back, so the final logits follow it.
    """
    B = len(prompts)
    L, H, D = graph.layers, graph.num_kv_heads, graph.head_dim
    float_dtype = np.dtype(graph.dtype)
    slots = list(kv_slots) if kv_slots is not None else list(range(B))
    caches = [[(np.zeros((ctx_len, full_batch, H, D), float_dtype), np.zeros((ctx_len, full_batch, H, D),
                                                                            float_dtype)) for _ in range(L)]
              for _ in runners]
    lengths = [0] * B  # tokens already in each row's cache
    pending = [list(p) for p in prompts]  # tokens still to feed per row
    generated: list[list[int]] = [[] for _ in range(B)]
    final = [np.zeros((B, graph.vocab_size), np.float32) for _ in runners]
    calls = 0
    # Stop flag: never more calls than tokens to feed.
    for _ in range(max(len(p) for p in prompts) + decode_steps + 2):
        if not any(pending):
            break
        calls += 1
        S = max(1, min(chunk, max(len(p) for p in pending)))
        ids = np.zeros((B, S), np.int64)
        pos = np.full((B, S), gc.PAD_POSITION, np.int64)
        fed = [0] * B
        for b in range(B):
            take = pending[b][:S]
            fed[b] = len(take)
            ids[b, :len(take)] = take
            pos[b, :len(take)] = np.arange(lengths[b], lengths[b] + len(take))
        P = max(1, max(lengths))
        feeds = {gc.INPUT_IDS: ids, gc.POSITION_IDS: pos,
                 gc.LORA_IDS: np.asarray(lora_ids, np.int64).reshape(B, 1),
                 gc.BATCH_INDEX: np.asarray(slots, np.int64).reshape(B, 1), **banks}
        first_logits = None
        for r, run in enumerate(runners):
            for i in range(L):
                feeds[gc.past_key(i)] = caches[r][i][0][:P]
                feeds[gc.past_value(i)] = caches[r][i][1][:P]
            outs = run(dict(feeds))
            if first_logits is None:
                first_logits = outs[0]
            for b in range(B):
                if fed[b]:
                    final[r][b] = outs[0][b, 0]
            for i in range(L):
                k_new, v_new = outs[1 + 2 * i], outs[2 + 2 * i]  # [S, B, H, D]
                for b in range(B):
                    for s in range(fed[b]):
                        caches[r][i][0][lengths[b] + s, slots[b]] = k_new[s, b]
                        caches[r][i][1][lengths[b] + s, slots[b]] = v_new[s, b]
        for b in range(B):
            pending[b] = pending[b][fed[b]:]
            lengths[b] += fed[b]
            if fed[b] and not pending[b] and len(generated[b]) < decode_steps:
                nxt = int(np.argmax(first_logits[b, 0]))
                generated[b].append(nxt)
                pending[b] = [nxt]
    return final, generated, calls


def verify_graph(session, decoder: MultiLoraDecoder, graph: GraphSpec, banks: Mapping[str, np.ndarray], *,
                 dtype: str, occupied_slots: int, chunk: int, ctx_len: int, decode_steps: int = 3,
                 seed: int = 0) -> VerifyReport:
    """Compare ``session`` with the float32 PyTorch ``decoder`` (banks already installed)."""
    rng = np.random.default_rng(seed)
    B = 4
    lora_ids = [b % (occupied_slots + 1) for b in range(B)]  # includes slot 0 (base)
    lengths = [max(1, min(ctx_len - decode_steps - 1, n)) for n in (2 * chunk + 1, chunk, 3, chunk + 2)]
    prompts = [rng.integers(0, graph.vocab_size, n).tolist() for n in lengths]
    full_batch = B + 1
    kv_slots = [full_batch - 1 - b for b in range(B)]  # not the identity, to exercise batch_index
    feeds_banks = {k: v.astype(graph.dtype) for k, v in banks.items()}
    ref_banks = {k: v.astype(np.float32) for k, v in banks.items()}
    ref_graph = GraphSpec(**{**graph.__dict__, "dtype": "float32"})
    (ort_final,), ort_tokens, calls = drive(
        [ort_runner(session)], graph, feeds_banks, prompts, lora_ids, chunk=chunk, decode_steps=decode_steps,
        ctx_len=ctx_len, full_batch=full_batch, kv_slots=kv_slots)
    # The reference reads the same token sequences (prompt + ORT's tokens) in its own chunking, so
    # one argmax tie cannot derail the comparison and chunk boundaries are exercised too.
    ref_prompts = [p + t for p, t in zip(prompts, ort_tokens, strict=True)]
    (ref_final,), _, _ = drive([torch_runner(decoder, ref_graph)], ref_graph, ref_banks, ref_prompts, lora_ids,
                               chunk=chunk + 1, decode_steps=0, ctx_len=ctx_len, full_batch=full_batch,
                               kv_slots=kv_slots)
    diff = float(np.abs(ort_final - ref_final).max())
    scale = max(1.0, float(np.abs(ref_final).max()))
    tol = TOLERANCE[dtype]
    tokens_match = bool((ort_final.argmax(-1) == ref_final.argmax(-1)).all())
    report = VerifyReport(max_abs_diff=diff, relative_diff=diff / scale, tolerance=tol,
                          calls=calls, tokens_match=tokens_match)
    if not np.isfinite(ort_final).all():
        raise VerificationFailed("ONNX Runtime produced non-finite logits", float("inf"))
    if diff / scale > tol:
        raise VerificationFailed(
            f"exported graph ({dtype}) differs from the PyTorch reference: max abs diff {diff:.6g} "
            f"(relative {diff / scale:.3g} > tolerance {tol:g})", diff)
    return report

