"""The contract between the compiler's ONNX graphs and the inference runtime.

Both sides import these names; neither hard-codes them. Shapes use these letters:

  B  rows in this call            S  tokens per row in this call (prefill chunk or 1)
  P  past tokens handed in        F  full_batch_size (KV-cache slots)
  L  decoder layers               N  adapter_slots + 1 (slot 0 = base model, all zeros)
  R  max_rank                     H  key/value heads, D head_dim, V vocab

Target "onnxruntime" (the portable graph):

  inputs
    input_ids      int64 [B, S]
    position_ids   int64 [B, S]   absolute positions; -1 marks padding (and idle rows)
    lora_ids       int64 [B, 1]   0 = base model, k = adapter slot k
    batch_index    int64 [B, 1]   the KV-cache slot (0..F-1) of each row
    past_key.{i}   float [P, F, H, D]  for i in range(L); the runtime's cache, sliced to the
    past_value.{i} float [P, F, H, D]  first P positions (P = longest position in use, >= 1):
                                       time-major, so cache[:P] is a contiguous view and a step
                                       costs what is in use, not ctx_len.
                                       Row b attends past entries j < position_ids[b, 0].
    lora_a.{m}     float [L, N, in_m, R]   adapter banks per target module m (graph inputs, so
    lora_b.{m}     float [L, N, R, out_m]  a new adapter needs no recompile). lora_b holds
                                           B * scaling (scaling = alpha/r or alpha/sqrt(r));
                                           ranks below R are zero-padded.
  outputs
    logits          float [B, 1, V]   logits at each row's last non-padding token
    present_key.{i}   float [S, B, H, D]  K (after RoPE) / V of this call's tokens; the runtime
    present_value.{i} float [S, B, H, D]  writes cache[position_ids[b, s], batch_index[b]] for
                                          every non-padding (b, s).

Target "onnxruntime", kv_layout "shared-buffer" (the fused graph, services/compiler/fused; fp32, int8,
int4): no batch_index. The runtime calls it over a contiguous KV-slot range lo..hi: a prefill call with
one row's chunk, or with the first chunks of rows in adjacent slots (the shorter ones right-padded to the
longest, their padding written past their real length), a decode call with the decoding rows (others in
the range ride along as dummy rows); driver: loraflow/artifact/step_driver.py.

  inputs
    input_ids              int64 [B, S]
    lora_ids               int64 [B, 1]
    seqlens_k              int32 [B]   tokens in row b's cache after this call, minus one
    total_sequence_length  int32 []    max over rows of seqlens_k + 1
    logits_index           int64 [B, 1] index in 0..S-1 (or -1, the last) of the token whose logits
                                        row b returns (its last real token); absent before graph3
    past_key.{i}   float [B, H, C, D]  cache[i, lo:hi] (C = ctx_len); bound as present_key.{i} too:
    past_value.{i} float [B, H, C, D]  GroupQueryAttention writes this call's K (after RoPE) / V in place
    lora_a.{m}     float [L*N, in, R]  the banks above, flattened (layer, slot): row b of layer i uses
    lora_b.{m}     float [L*N, R, out] slice i*N + lora_ids[b]. From graph6 on L*N and N are symbolic
                                       (dims "L*N", "N"): the graph derives N from the banks' first
                                       dimension, so the runtime chooses the slot count (services/inference
                                       sizes it from the memory budget); before, N was the compiled count
    lora_ranks     int64 [N, P]        the rank of each slot's adapter in each of the P adapted modules (bank
                                       order; slot 0, empty slots and modules the adapter does not touch: 0;
                                       columns of A / rows of B past it are zero padding); model.native.onnx
                                       only (manifest graph.native_inputs): each LoraRows node reads its
                                       module's column (attribute rank_column) and computes only that many
                                       columns per row, none for a rank of 0. graph5-7: [N], one rank per slot
                                       (every module); absent before graph5. model.onnx does not take it (its
                                       Gather/MatMul run all R columns).
  outputs
    logits            float [B, 1, V]  at each row's token logits_index[b]
    present_key.{i}   float [B, H, C, D]  the same memory as past_key.{i}
    present_value.{i} float [B, H, C, D]

Target "ai100" (QEfficient-compatible): past_key.{i} / past_value.{i} are [F, H, ctx_len, D],
updated inside the graph by position and returned as past_key.{i}_RetainedState.
"""

from __future__ import annotations

# Module names a LoRA adapter may target in a decoder block, in canonical order.
LORA_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# Projections a family stores packed (Phi-3's q|k|v and gate|up): a PEFT adapter targets the packed module,
# its B spans every column of the packed output ([hidden, q+2kv], [hidden, 2I]).
PACKED_LORA_MODULES: tuple[str, ...] = ("qkv_proj", "gate_up_proj")
# Every module name a bank may hold, in canonical (bank) order.
ALL_LORA_MODULES: tuple[str, ...] = LORA_TARGET_MODULES + PACKED_LORA_MODULES

INPUT_IDS = "input_ids"
# Fused layout only (GroupQueryAttention): per row, tokens in its cache after this call minus one;
# and the longest row's total length.
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
# Fused layout only: per row, the index (within this call's S tokens) of the token whose logits it returns
# (-1: the last). Graphs compiled before it (graph2) lack it and prefill one row per call.
LOGITS_INDEX = "logits_index"
# GraphSpec.kv_layout values.
KV_LAYOUT_TIME_MAJOR = "time-major"
KV_LAYOUT_SHARED = "shared-buffer"
# Fused layout only: int64 [N, P] (graph8; [N] graph5-7), the rank of each adapter slot per module (see above). Graphs compiled before it lack it.
LORA_RANKS = "lora_ranks"
POSITION_IDS = "position_ids"
LORA_IDS = "lora_ids"
BATCH_INDEX = "batch_index"
LOGITS = "logits"

# Symbolic dims of the fused graph's banks (graph6 on): rows (layer, slot) and slots a layer.
BANK_ROWS_DIM = "L*N"
SLOTS_DIM = "N"


def runtime_slots(inputs) -> bool:
    """Whether a graph's bank inputs (manifest TensorSpecs) leave the slot count to the runtime (graph6 on)."""
    banks = [t for t in inputs if t.name.startswith(("lora_a.", "lora_b."))]
    return bool(banks) and all(isinstance(t.shape[0], str) for t in banks)


# Position id that marks a padding token or an idle row.
PAD_POSITION = -1


def past_key(layer: int) -> str:
    return f"past_key.{layer}"


def past_value(layer: int) -> str:
    return f"past_value.{layer}"


def present_key(layer: int) -> str:
    return f"present_key.{layer}"


def present_value(layer: int) -> str:
    return f"present_value.{layer}"


def retained_key(layer: int) -> str:
    """AI 100 output that aliases past_key.{layer} (retained state)."""
    return f"past_key.{layer}_RetainedState"


def retained_value(layer: int) -> str:
    return f"past_value.{layer}_RetainedState"


def lora_a(module: str) -> str:
    return f"lora_a.{module}"


def lora_b(module: str) -> str:
    return f"lora_b.{module}"
