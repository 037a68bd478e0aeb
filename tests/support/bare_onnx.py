"""Run a compiled artifact in a bare onnxruntime.InferenceSession: no loraflow runtime involved."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def bare_prefill(artifact_dir: Path, token_rows: list[list[int]], lora_ids: list[int]) -> np.ndarray:
    """Prefill equal-length rows at positions 0.. with an empty cache and zero adapter banks
    (every slot behaves as the base model); returns logits [rows, 1, vocab]."""
    import onnxruntime as ort

    from loraflow.artifact import graph_contract as gc
    from loraflow.artifact.manifest import Manifest

    manifest = Manifest.load(artifact_dir / "manifest.json")
    session = ort.InferenceSession(str(artifact_dir / manifest.graph.file), providers=["CPUExecutionProvider"])
    cfg = manifest.base_model.config
    rows, seq = len(token_rows), len(token_rows[0])
    if manifest.graph.shared_kv:
        # Fused graph: equal-length rows from an empty cache; the [B, H, ctx_len, D] cache is updated in place.
        feeds = {gc.INPUT_IDS: np.array(token_rows, dtype=np.int64),
                 gc.LORA_IDS: np.array(lora_ids, dtype=np.int64).reshape(rows, 1),
                 gc.SEQLENS_K: np.full(rows, seq - 1, dtype=np.int32),
                 gc.TOTAL_SEQUENCE_LENGTH: np.array(seq, dtype=np.int32)}
        if any(spec.name == gc.LOGITS_INDEX for spec in manifest.graph.inputs):
            feeds[gc.LOGITS_INDEX] = np.full((rows, 1), -1, dtype=np.int64)  # each row's last token
        for spec in manifest.graph.inputs:
            if spec.name.startswith(("past_key", "past_value")):
                feeds[spec.name] = np.zeros([rows, *spec.shape[1:]], dtype=np.float32)
            elif spec.name.startswith(("lora_a", "lora_b")):
                # [L*N, ...]: symbolic from graph6 on (the runtime picks N); the compiled N here
                rows_lora = manifest.graph.layers * (manifest.adapter_slots + 1)
                shape = [rows_lora if isinstance(spec.shape[0], str) else spec.shape[0], *spec.shape[1:]]
                feeds[spec.name] = np.zeros(shape, dtype=np.float32)
        return session.run([gc.LOGITS], feeds)[0]
    feeds = {gc.INPUT_IDS: np.array(token_rows, dtype=np.int64),
             gc.POSITION_IDS: np.tile(np.arange(seq, dtype=np.int64), (rows, 1)),
             gc.LORA_IDS: np.array(lora_ids, dtype=np.int64).reshape(rows, 1),
             gc.BATCH_INDEX: np.arange(rows, dtype=np.int64).reshape(rows, 1)}
    for spec in manifest.graph.inputs:
        if spec.name.startswith(("past_key", "past_value")):
            # One past position that no row may attend (position_ids start at 0).
            feeds[spec.name] = np.zeros((1, rows, cfg["num_kv_heads"], cfg["head_dim"]), dtype=np.float32)
        elif spec.name.startswith(("lora_a", "lora_b")):
            feeds[spec.name] = np.zeros(list(spec.shape), dtype=np.float32)
    return session.run([gc.LOGITS], feeds)[0]
