"""The traced ("time-major") graph run through loraflow.artifact.traced_step_driver.TracedStepDriver.

The tiny Llama here has head_dim 8, which the fused builder refuses, so an fp32 compile writes the traced
graph (as fp16 always does); its verification already ran through TracedStepDriver. Then:

* the driver on a bare session gives the PyTorch decoder's logits (each row's whole sequence from an
  empty cache) for mixed adapters with the base model among them, rows in non-identity KV slots, chunked
  prefill with rows sharing calls, prefill and decode rows in one call, and a row joining later;
* OrtRuntime serves the traced graph through the same driver, with banks laid out by lora_bank (a
  hot-added adapter included);
* bad rows raise InvalidArgument naming the field; verification fails on a wrong reference and on
  non-finite logits.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from loraflow.artifact import graph_contract as gc
from loraflow.artifact import lora_bank
from loraflow.artifact.scheduler import ScheduledRow, SchedulerOutput
from loraflow.artifact.step_driver import Row
from loraflow.artifact.traced_step_driver import PAST_BUCKET, TracedStepDriver
from loraflow.errors import InvalidArgument
from services.compiler.modeling import load_decoder
from services.compiler.verify import VerificationFailed, decoder_reference, reference_logits, verify_graph
from tests.compiler.conftest import save_peft_adapter
from tests.support.tiny_models import make_tiny_model_dir

CTX = 32
SLOTS = 4
TOL = 1e-4  # fp32: relative to max(1, max |reference logit|)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "q_proj")


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(model_dir, {name: adapter dir}, artifact_dir, manifest): adapters "attn" (slot 1) and "mlp" (slot 2)
    compiled in, "hot" only on disk; 3 adapter slots, 4 KV slots, ctx 32."""
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    root = tmp_path_factory.mktemp("traced")
    model = make_tiny_model_dir(root / "model", "llama", num_attention_heads=8)  # head_dim 64 / 8 = 8
    adapters = {"attn": save_peft_adapter(model, root / "attn", r=4, lora_alpha=8, target_modules=ATTN, seed=1),
                "mlp": save_peft_adapter(model, root / "mlp", r=8, lora_alpha=16, use_rslora=True,
                                         target_modules=MLP, seed=2),
                "hot": save_peft_adapter(model, root / "hot", r=2, lora_alpha=4, target_modules=("v_proj", "down_proj"),
                                         seed=3)}
    options = CompileOptions(batch_size=2, full_batch_size=SLOTS, prefill_seq_len=4, ctx_len=CTX, max_rank=8,
                             adapter_slots=3)
    manifest = build_artifact(model, [("attn", adapters["attn"]), ("mlp", adapters["mlp"])], options, root / "art")
    return model, adapters, root / "art", manifest


def _banks(manifest, artifact_dir, extra: dict | None = None):
    """(banks_a, banks_b, feeds by graph input name) of the artifact's adapters, plus ``extra`` {slot: dir}."""
    spec = lora_bank.BankSpec.from_manifest(manifest)
    banks_a, banks_b = lora_bank.empty_banks(spec)
    entries = [(e.slot, e.name, artifact_dir / e.path) for e in manifest.adapters]
    entries += [(slot, f"extra{slot}", path) for slot, path in (extra or {}).items()]
    for slot, name, path in entries:
        lora_bank.write_slot(banks_a, banks_b, slot, lora_bank.read_adapter(name, path), spec)
    feeds = {**{gc.lora_a(m): banks_a[m] for m in spec.modules}, **{gc.lora_b(m): banks_b[m] for m in spec.modules}}
    return banks_a, banks_b, feeds


def _session(artifact_dir, manifest):
    return ort.InferenceSession(str(artifact_dir / manifest.graph.file), providers=["CPUExecutionProvider"])


class Rows:
    """Each row's sequence so far and its sampled logits, checked against the PyTorch decoder at the end."""

    def __init__(self, vocab: int, specs: dict[str, tuple[int, int, int]], seed: int = 0):
        rng = np.random.default_rng(seed)
        # name -> (KV slot, lora_id, prompt length)
        self.slot = {n: s for n, (s, _, _) in specs.items()}
        self.lora = {n: lo for n, (_, lo, _) in specs.items()}
        self.prompt = {n: rng.integers(3, vocab, length).tolist() for n, (_, _, length) in specs.items()}
        self.fed = dict.fromkeys(specs, 0)  # prompt tokens already fed
        self.seq = {n: [] for n in specs}
        self.sampled: dict[str, list[tuple[int, np.ndarray]]] = {n: [] for n in specs}

    def chunk(self, name: str, size: int) -> Row:
        start = self.fed[name]
        piece = tuple(self.prompt[name][start:start + size])
        return Row(self.slot[name], self.lora[name], piece, start)

    def next_token(self, name: str) -> Row:
        return Row(self.slot[name], self.lora[name], (int(np.argmax(self.sampled[name][-1][1])),), len(self.seq[name]))

    def fed_rows(self, names: list[str], rows: list[Row], logits: np.ndarray) -> None:
        """Record a call's rows: a row's logits are sampled once its prompt is done (and on every decode)."""
        for name, row, out in zip(names, rows, logits, strict=True):
            self.seq[name] += list(row.token_ids)
            if row.start_position < len(self.prompt[name]):
                self.fed[name] += len(row.token_ids)
                if self.fed[name] < len(self.prompt[name]):
                    continue
            self.sampled[name].append((len(self.seq[name]) - 1, out.copy()))

    def check(self, decoder, banks) -> int:
        checked = 0
        for name in self.seq:
            assert self.seq[name][:len(self.prompt[name])] == self.prompt[name]
            ref = reference_logits(decoder, self.seq[name], self.lora[name], banks)
            for pos, got in self.sampled[name]:
                scale = max(1.0, float(np.abs(ref[pos]).max()))
                diff = float(np.abs(got - ref[pos]).max())
                assert diff / scale < TOL, f"row {name} position {pos}: relative diff {diff / scale:.3g}"
                assert np.argmax(got) == np.argmax(ref[pos]), f"row {name} position {pos}: greedy token differs"
                checked += 1
        return checked


def test_fp32_compile_of_a_head_dim_8_model_is_traced_and_verified_through_the_driver(traced):
    from services.compiler.fused.builder import fused_graph_supported
    from services.compiler.modeling import DecoderConfig

    model, _, _, manifest = traced
    assert fused_graph_supported(DecoderConfig.from_model_dir(model)) is not None
    assert not manifest.graph.shared_kv and manifest.graph.head_dim == 8 and manifest.graph.dtype == "float32"
    verify = manifest.extra["verify"]
    assert verify["relative_diff"] < verify["tolerance"] == 1e-4 and verify["tokens_match"]


def test_driver_matches_the_decoder_for_mixed_adapters_chunks_and_a_late_row(traced):
    model, _, artifact_dir, manifest = traced
    _, _, feeds = _banks(manifest, artifact_dir)
    decoder = load_decoder(model, tuple(manifest.graph.lora_modules))
    driver = TracedStepDriver.from_graph(_session(artifact_dir, manifest), manifest.graph, feeds, slots=SLOTS,
                                         ctx_len=CTX)
    # Non-identity slots, slot 1 free until "late" joins; base model (lora 0) among the adapters.
    rows = Rows(manifest.graph.vocab_size, {"a": (3, 2, 9), "b": (0, 0, 4), "c": (2, 1, 6), "late": (1, 1, 5)})
    try:
        # Chunked prefill (4 tokens a call), rows sharing calls; the shorter chunks are right-padded.
        while any(rows.fed[n] < len(rows.prompt[n]) for n in ("a", "b", "c")):
            names = [n for n in ("a", "b", "c") if rows.fed[n] < len(rows.prompt[n])]
            step = [rows.chunk(n, 4) for n in names]
            rows.fed_rows(names, step, driver.prefill_rows(step))
        for _ in range(2):
            step = [rows.next_token(n) for n in ("a", "b", "c")]
            rows.fed_rows(["a", "b", "c"], step, driver.decode(step))
        # "late" joins: its first chunk and two decode rows (b waits) in one call, then its last token
        # (a 1-token prefill) with every decode row.
        names = ["c", "late", "a"]
        step = [rows.next_token("c"), rows.chunk("late", 4), rows.next_token("a")]
        rows.fed_rows(names, step, driver.step(step))
        names = ["late", "a", "b", "c"]
        step = [rows.chunk("late", 4)] + [rows.next_token(n) for n in names[1:]]
        rows.fed_rows(names, step, driver.step(step))
        for _ in range(2):
            names = ["b", "late", "c", "a"]
            step = [rows.next_token(n) for n in names]
            rows.fed_rows(names, step, driver.decode(step))
        assert driver.calls == 3 + 2 + 2 + 2  # every call of the schedule above, no more
    finally:
        driver.close()
    # a: prompt end, 2 + 1 + 1 + 2 decodes; b: 2 + 1 + 2; c as a; late: prompt end, 2 decodes.
    assert rows.check(decoder, feeds) == 7 + 6 + 7 + 3


def test_bad_rows_are_refused_naming_the_field(traced):
    _, _, artifact_dir, manifest = traced
    _, _, feeds = _banks(manifest, artifact_dir)
    driver = TracedStepDriver.from_graph(_session(artifact_dir, manifest), manifest.graph, feeds, slots=SLOTS,
                                         ctx_len=CTX)
    bad = [
        ([Row(SLOTS, 0, (5,), 0)], "slot", SLOTS),
        ([Row(-1, 0, (5,), 0)], "slot", -1),
        ([Row(0, 0, (5, 6, 7), CTX - 2)], "position_ids", CTX + 1),  # the last token would sit at position ctx_len
        ([Row(0, 0, (), 0)], "position_ids", 0),
        ([Row(0, 4, (5,), 0)], "lora_ids", 4),  # 3 adapter slots + the base
        ([Row(1, 0, (5,), 0), Row(1, 1, (6,), 0)], "slot", [1, 1]),
        ([], "rows", 0),
    ]
    try:
        for rows, field, value in bad:
            with pytest.raises(InvalidArgument) as err:
                driver.step(rows)
            assert (err.value.field, err.value.value) == (field, value), rows
        with pytest.raises(InvalidArgument) as err:
            driver.decode([Row(0, 0, (5, 6), 0)])
        assert err.value.field == "token_ids" and err.value.value == 2
        with pytest.raises(InvalidArgument) as err:
            driver.reset(SLOTS)
        assert err.value.field == "slot"
        assert driver.calls == 0 and not driver.k.any()  # nothing ran, nothing was written
        with pytest.raises(InvalidArgument) as err:
            TracedStepDriver.from_graph(_session(artifact_dir, manifest), manifest.graph, feeds, slots=0, ctx_len=CTX)
        assert err.value.field == "slots"
    finally:
        driver.close()


def test_runtime_serves_the_traced_graph_with_lora_bank_banks(traced):
    from services.inference.runtime import OrtRuntime

    model, adapters, artifact_dir, manifest = traced
    runtime = OrtRuntime(artifact_dir, manifest, num_threads=1)
    try:
        assert not runtime.shared_kv and isinstance(runtime._driver, TracedStepDriver)
        hot = runtime.load_adapter("hot", adapters["hot"])
        assert hot == 3
        banks_a, banks_b, feeds = _banks(manifest, artifact_dir, {hot: adapters["hot"]})
        for m in banks_a:  # the compiler's layout, the hot-added slot included
            np.testing.assert_array_equal(runtime.lora_a[m], banks_a[m])
            np.testing.assert_array_equal(runtime.lora_b[m], banks_b[m])
        decoder = load_decoder(model, tuple(manifest.graph.lora_modules))
        rng = np.random.default_rng(4)
        prompts = {1: rng.integers(3, manifest.graph.vocab_size, 6).tolist(),
                   3: rng.integers(3, manifest.graph.vocab_size, 3).tolist()}
        loras = {1: hot, 3: 2}
        prefill = SchedulerOutput("prefill", tuple(ScheduledRow(f"r{s}", s, loras[s], tuple(p), 0, True)
                                                   for s, p in prompts.items()), seq_len=8)  # padded past both
        logits = runtime.execute(prefill).copy()
        seqs = {s: list(p) for s, p in prompts.items()}
        tokens = {s: int(np.argmax(logits[i])) for i, s in enumerate(prompts)}
        decode = SchedulerOutput("decode", tuple(ScheduledRow(f"r{s}", s, loras[s], (tokens[s],), len(seqs[s]), True)
                                                 for s in prompts), seq_len=1)
        stepped = runtime.execute(decode).copy()
        for i, s in enumerate(prompts):
            seqs[s].append(tokens[s])
            ref = reference_logits(decoder, seqs[s], loras[s], feeds)
            for got, want in ((logits[i], ref[len(prompts[s]) - 1]), (stepped[i], ref[-1])):
                assert np.abs(got - want).max() / max(1.0, float(np.abs(want).max())) < TOL
        cache = runtime._driver.nbytes
        assert cache == 2 * 4 * manifest.graph.layers * CTX * SLOTS * manifest.graph.num_kv_heads * 8
        assert runtime.memory_bytes() >= cache + sum(b.nbytes for b in banks_a.values())
        assert runtime._driver.k[:, :, 1].any()
        runtime.reset_slot(1)
        assert not runtime._driver.k[:, :, 1].any() and runtime._driver.k[:, :, 3].any()
        too_far = SchedulerOutput("decode", (ScheduledRow("x", 0, 0, (5,), CTX + 1, True),), seq_len=1)
        with pytest.raises(InvalidArgument, match=f"ctx_len is {CTX}") as err:
            runtime.execute(too_far)
        assert err.value.field == "position_ids" and err.value.value == CTX + 1
        runtime.adapters.release_reservation(hot)  # zeroes the slot through lora_bank.clear_slot
        assert not any(runtime.lora_a[m][:, hot].any() or runtime.lora_b[m][:, hot].any() for m in runtime.lora_a)
    finally:
        runtime.close()


def test_past_is_bound_in_buckets_of_the_positions_in_use(traced):
    _, _, artifact_dir, manifest = traced
    _, _, feeds = _banks(manifest, artifact_dir)
    driver = TracedStepDriver.from_graph(_session(artifact_dir, manifest), manifest.graph, feeds, slots=SLOTS,
                                         ctx_len=CTX)
    try:
        driver.step([Row(0, 1, tuple(range(3, 3 + PAST_BUCKET + 2)), 0)])
        assert driver._bound_past == PAST_BUCKET  # P = 1 rounds up to one bucket
        driver.step([Row(0, 1, (7,), PAST_BUCKET + 2)])
        assert driver._bound_past == min(CTX, 2 * PAST_BUCKET)
    finally:
        driver.close()


def test_traced_verification_fails_on_a_wrong_reference_and_on_non_finite_logits(traced, tmp_path):
    model, _, artifact_dir, manifest = traced
    _, _, feeds = _banks(manifest, artifact_dir)
    session = _session(artifact_dir, manifest)
    decoder = load_decoder(model, tuple(manifest.graph.lora_modules))
    ok = verify_graph(session, decoder_reference(decoder, feeds), manifest.graph, feeds, dtype="fp32", occupied_slots=2,
                      chunk=4, ctx_len=CTX)
    assert ok.relative_diff < 1e-4 and ok.tokens_match and ok.calls >= 10
    other_dir = make_tiny_model_dir(tmp_path / "other", "llama", seed=1, num_attention_heads=8)
    other = load_decoder(other_dir, tuple(manifest.graph.lora_modules))
    with pytest.raises(VerificationFailed, match=r"exported graph \(fp32\) differs .* max abs diff \d") as err:
        verify_graph(session, decoder_reference(other, feeds), manifest.graph, feeds, dtype="fp32", occupied_slots=2,
                     chunk=4, ctx_len=CTX)
    assert err.value.max_abs_diff > 1e-2
    # An adapter slot holding NaN: the graph's logits are caught before any comparison.
    broken = dict(feeds)
    broken[gc.lora_b("q_proj")] = feeds[gc.lora_b("q_proj")].copy()
    broken[gc.lora_b("q_proj")][:, 1] = np.nan
    with pytest.raises(VerificationFailed, match="non-finite") as err:
        verify_graph(session, decoder_reference(decoder, broken), manifest.graph, broken, dtype="fp32", occupied_slots=2,
                     chunk=4, ctx_len=CTX)
    assert err.value.max_abs_diff == float("inf")
