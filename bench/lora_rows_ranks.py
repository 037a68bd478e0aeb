"""LoraRows time per decode step with and without ``lora_ranks``: small adapters in a large-rank bank.

One graph holds the LoraRows nodes of a decode step of SmolLM2-135M (30 layers x q/k/v/o/gate/up/down,
hidden 576, kv 192, intermediate 1536), each over its own bank [L*N, in, R] / [L*N, R, out]; B rows of
one token each, every row on its own slot holding a rank-``--rank`` adapter zero-padded to ``--max-rank``.
With ``--targets mixed`` each slot's adapter touches only some modules, drawn as bench/loadgen.py draws them
(q,v 50%, q,k,v,o 35%, all seven 15%); its slices of the others are zero. Sessions over the same inputs, one
intra-op thread, no spinning:

  full_rank_ms   5-input nodes (graphs before lora_ranks): every row computes all max_rank columns
  ranked_ms      6-input nodes fed lora_ranks [N] (graph5-7): every row computes its own slot's rank, in every
                 module, touched or not
  module_ranked_ms  nodes fed lora_ranks [N, P] with rank_column (graph8): its own rank of each module, nothing
                 where its adapter does not touch the module
  small_bank_ms  5-input nodes over a bank of max_rank = rank (the floor: the same work, dense banks)

Each is the median wall time of ``--runs`` runs of the whole graph (kernel time plus ORT's per-node
overhead for 210 nodes). Prints one JSON object with the host's ``uptime`` before and after.

Usage: python bench/lora_rows_ranks.py [--rows 8] [--rank 4] [--max-rank 64] [--targets all|mixed] [--runs 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loraflow import native as native_lora  # noqa: E402

LAYERS = 30
# module -> (in, out) of SmolLM2-135M
MODULES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
           "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


# bench/loadgen.py's target sets and their shares.
TARGET_SETS = ((("q_proj", "v_proj"), 0.50), (("q_proj", "k_proj", "v_proj", "o_proj"), 0.35), (tuple(MODULES), 0.15))


def _session(slots: int, ranks: str | None):
    """``ranks``: None (5 inputs), "slot" ([N]) or "module" ([N, P], each node its module's column)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", 1])]
    if ranks:
        inputs.append(helper.make_tensor_value_info("ranks", TensorProto.INT64,
                                                    [slots] if ranks == "slot" else [slots, len(MODULES)]))
    nodes, outputs = [], []
    for column, (m, (fin, fout)) in enumerate(MODULES.items()):
        inputs += [helper.make_tensor_value_info(f"x.{m}", TensorProto.FLOAT, ["B", 1, fin]),
                   helper.make_tensor_value_info(f"y.{m}", TensorProto.FLOAT, ["B", 1, fout]),
                   helper.make_tensor_value_info(f"a.{m}", TensorProto.FLOAT, [LAYERS * slots, fin, "R"]),
                   helper.make_tensor_value_info(f"b.{m}", TensorProto.FLOAT, [LAYERS * slots, "R", fout])]
        for layer in range(LAYERS):
            names = [f"y.{m}", f"x.{m}", "ids", f"a.{m}", f"b.{m}"] + (["ranks"] if ranks else [])
            out = f"out.{m}.{layer}"
            column_attr = {"rank_column": column} if ranks == "module" else {}
            nodes.append(helper.make_node("LoraRows", names, [out], domain=native_lora.DOMAIN, name=out,
                                          bank_offset=layer * slots, column_offset=0, **column_attr))
            outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["B", 1, fout]))
    graph = helper.make_graph(nodes, "decode_lora", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(native_lora.DOMAIN, native_lora.OPSET)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    native_lora.register(so)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _banks(slots: int, rank: int, max_rank: int, touched: list[tuple[str, ...]], rng) -> dict[str, np.ndarray]:
    """``touched[s]``: the modules slot s's adapter adapts (its slices of the others stay zero)."""
    feeds = {}
    for m, (fin, fout) in MODULES.items():
        a = np.zeros((LAYERS * slots, fin, max_rank), np.float32)  # [L*N, in, R], zero past the rank
        b = np.zeros((LAYERS * slots, max_rank, fout), np.float32)  # [L*N, R, out]
        a[:, :, :rank] = rng.normal(size=(LAYERS * slots, fin, rank)).astype(np.float32) * 0.05
        b[:, :rank, :] = rng.normal(size=(LAYERS * slots, rank, fout)).astype(np.float32) * 0.05
        for slot in range(slots):
            if m not in touched[slot]:  # slot 0 (the base model) touches nothing
                a[slot::slots] = 0
                b[slot::slots] = 0
        feeds[f"a.{m}"], feeds[f"b.{m}"] = a, b
    return feeds


def _median_ms(session, feeds: dict, runs: int) -> tuple[float, list[np.ndarray]]:
    out = session.run(None, feeds)  # warm-up (and the outputs to compare)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--targets", choices=("all", "mixed"), default="all",
                        help="every adapter adapts all seven modules, or bench/loadgen.py's mix")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    slots = args.rows + 1  # every row on its own adapter; slot 0 = base
    ids = np.arange(1, args.rows + 1, dtype=np.int64).reshape(args.rows, 1)  # [B, 1]
    activations = {}
    for m, (fin, fout) in MODULES.items():
        activations[f"x.{m}"] = rng.normal(size=(args.rows, 1, fin)).astype(np.float32)
        activations[f"y.{m}"] = rng.normal(size=(args.rows, 1, fout)).astype(np.float32)
    if args.targets == "all":
        touched = [()] + [tuple(MODULES)] * args.rows
    else:
        picks = rng.choice(len(TARGET_SETS), size=args.rows, p=[p for _, p in TARGET_SETS])
        touched = [()] + [TARGET_SETS[i][0] for i in picks]
    banks = _banks(slots, args.rank, args.max_rank, touched, rng)
    module_ranks = np.array([[args.rank if m in t else 0 for m in MODULES] for t in touched], np.int64)  # [N, P]
    ranks = module_ranks.max(axis=1)  # [N]
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    feeds = {"ids": ids, **activations, **banks}
    full_ms, full_out = _median_ms(_session(slots, None), feeds, args.runs)
    ranked_ms, ranked_out = _median_ms(_session(slots, "slot"), {**feeds, "ranks": ranks}, args.runs)
    module_ms, module_out = _median_ms(_session(slots, "module"), {**feeds, "ranks": module_ranks}, args.runs)
    small = {k: (v[..., :args.rank] if k.startswith("a.") else v[:, :args.rank, :]) for k, v in banks.items()}
    small = {k: np.ascontiguousarray(v) for k, v in small.items()}
    small_ms, _ = _median_ms(_session(slots, None), {**feeds, **small}, args.runs)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    max_diff = max(float(np.abs(f - r).max()) for f, r in zip(full_out, ranked_out, strict=True))
    module_diff = max(float(np.abs(f - r).max()) for f, r in zip(module_out, ranked_out, strict=True))
    print(json.dumps({"rows": args.rows, "rank": args.rank, "max_rank": args.max_rank, "targets": args.targets,
                      "nodes": LAYERS * len(MODULES), "full_rank_ms": round(full_ms, 3), "ranked_ms": round(ranked_ms, 3),
                      "module_ranked_ms": round(module_ms, 3), "small_bank_ms": round(small_ms, 3),
                      "speedup": round(full_ms / ranked_ms, 2), "module_speedup": round(ranked_ms / module_ms, 2),
                      "max_abs_diff_ranked_vs_full": max_diff, "max_abs_diff_module_vs_ranked": module_diff,
                      "uptime_before": uptime_before, "uptime_after": uptime_after}, indent=1))


if __name__ == "__main__":
    main()
