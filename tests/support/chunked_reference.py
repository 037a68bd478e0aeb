"""The PyTorch multi-LoRA decoder run the way the traced graph is run: a batch of rows in shuffled KV
slots, chunked prefill with right padding, then greedy decode steps, against a time-major cache
[ctx, F, H, D] per layer sliced to the first P positions in use. Test support only: the product runs
graphs through loraflow.artifact's step drivers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from loraflow.artifact import graph_contract as gc
from loraflow.artifact.manifest import GraphSpec
from services.compiler.export import OrtGraph


def drive_decoder(decoder, graph: GraphSpec, banks: Mapping[str, np.ndarray], prompts: Sequence[Sequence[int]],
                  lora_ids: Sequence[int], *, chunk: int, decode_steps: int, ctx_len: int, full_batch: int,
                  kv_slots: Sequence[int] | None = None) -> tuple[np.ndarray, list[list[int]], int]:
    """Prefill ``prompts`` in chunks of ``chunk`` tokens, then greedy-decode ``decode_steps`` tokens per row.

    Returns ([B, V] logits of each row's last fed token, generated tokens per row, number of calls).
    Every generated token is fed back, so the final logits follow it. The decoder is called with
    ONNX-style feeds in the export's flat input order (``graph.inputs``).
    """
    wrapper = OrtGraph(decoder).eval()
    names = [s.name for s in graph.inputs]
    B = len(prompts)
    L, H, D = graph.layers, graph.num_kv_heads, graph.head_dim
    float_dtype = np.dtype(graph.dtype)
    slots = list(kv_slots) if kv_slots is not None else list(range(B))
    k_cache = [np.zeros((ctx_len, full_batch, H, D), float_dtype) for _ in range(L)]  # L x [C, F, H, D]
    v_cache = [np.zeros((ctx_len, full_batch, H, D), float_dtype) for _ in range(L)]
    lengths = [0] * B  # tokens already in each row's cache
    pending = [list(p) for p in prompts]  # tokens still to feed per row
    generated: list[list[int]] = [[] for _ in range(B)]
    final = np.zeros((B, graph.vocab_size), np.float32)
    calls = 0
    # Never more calls than tokens to feed.
    for _ in range(max(len(p) for p in prompts) + decode_steps + 2):
        if not any(pending):
            break
        calls += 1
        S = max(1, min(chunk, max(len(p) for p in pending)))
        ids = np.zeros((B, S), np.int64)  # [B, S], right-padded
        pos = np.full((B, S), gc.PAD_POSITION, np.int64)  # [B, S], padding marked -1
        fed = [0] * B
        for b in range(B):
            take = pending[b][:S]
            fed[b] = len(take)
            ids[b, :len(take)] = take
            pos[b, :len(take)] = np.arange(lengths[b], lengths[b] + len(take))
        P = max(1, max(lengths))
        feeds = {gc.INPUT_IDS: ids, gc.POSITION_IDS: pos,
                 gc.LORA_IDS: np.asarray(lora_ids, np.int64).reshape(B, 1),  # [B] -> [B, 1]
                 gc.BATCH_INDEX: np.asarray(slots, np.int64).reshape(B, 1), **banks}  # [B] -> [B, 1]
        for i in range(L):
            feeds[gc.past_key(i)] = k_cache[i][:P]
            feeds[gc.past_value(i)] = v_cache[i][:P]
        with torch.no_grad():
            outs = [o.numpy() for o in wrapper(*[torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])]
        for b in range(B):
            if fed[b]:
                final[b] = outs[0][b, 0]
        for i in range(L):
            k_new, v_new = outs[1 + 2 * i], outs[2 + 2 * i]  # [S, B, H, D]
            for b in range(B):
                for s in range(fed[b]):
                    k_cache[i][lengths[b] + s, slots[b]] = k_new[s, b]
                    v_cache[i][lengths[b] + s, slots[b]] = v_new[s, b]
        for b in range(B):
            pending[b] = pending[b][fed[b]:]
            lengths[b] += fed[b]
            if fed[b] and not pending[b] and len(generated[b]) < decode_steps:
                nxt = int(np.argmax(outs[0][b, 0]))
                generated[b].append(nxt)
                pending[b] = [nxt]
    return final, generated, calls
