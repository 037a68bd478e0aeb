"""The engine on a real compiled tiny artifact (ONNX Runtime, CPU) against PEFT/HF greedy references."""

from __future__ import annotations

import threading
import time

import pytest

from loraflow.artifact.scheduler import FinishReason
from loraflow.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from services.inference import engine as engine_module
from services.inference.engine import Engine, GenerationRequest
from services.inference.model_manager import open_model
from services.inference.sampling import SamplingParams
from tests.inference.conftest import PROMPTS
from tests.support.held_steps import steps_held_after_first


@pytest.fixture(scope="module")
def model(tiny_artifact):
    artifact_dir, manifest = tiny_artifact
    loaded = open_model(artifact_dir, num_threads=1, model_id="tiny", manifest=manifest)
    yield loaded
    loaded.close()


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def submit(model, prompt_ids, adapter="", sampling=None, request_id=""):
    return model.engine.submit(GenerationRequest(tuple(prompt_ids), adapter, sampling or greedy(10), request_id))


def test_mixed_batch_rows_equal_peft_with_each_adapter_alone(model, tiny_tokenizer, peft_reference):
    rows = [(PROMPTS[0], ""), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "gamma")]
    ids = [tiny_tokenizer.encode(p) for p, _ in rows]
    handles = [submit(model, i, a, greedy(12)) for i, (_, a) in zip(ids, rows, strict=True)]
    results = [h.result() for h in handles]
    for prompt_ids, (_, adapter), result in zip(ids, rows, results, strict=True):
        assert list(result.token_ids) == peft_reference.generate(prompt_ids, adapter, 12), adapter
        assert result.prompt_tokens == len(prompt_ids) and result.completion_tokens == len(result.token_ids)
    # The adapters really change the output (otherwise the comparison above proves little).
    assert len({tuple(peft_reference.generate(ids[0], a, 12)) for a in ("", "alpha", "beta", "gamma")}) == 4


def test_streamed_text_equals_the_full_decode(model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("héllo wörld — ünïcode ✓ 日本語")
    handle = submit(model, prompt, "beta", greedy(40, ignore_eos=True))
    chunks = list(handle)
    ids = [t for c in chunks for t in c.token_ids]
    assert "".join(c.text for c in chunks) == tiny_tokenizer.decode(ids)
    assert chunks[-1].finish_reason == FinishReason.LENGTH and len(ids) == 40
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_continuous_batching_staggered_requests_equal_running_alone(model, tiny_tokenizer, peft_reference):
    # 7 requests over 4 KV slots, arriving in three waves while earlier ones decode.
    plan = [(PROMPTS[i % 4] + " " + "abc"[i % 3], ["", "alpha", "beta", "gamma"][i % 4], 6 + 3 * (i % 3))
            for i in range(7)]
    handles = []
    for wave in (plan[:3], plan[3:5], plan[5:]):
        for text, adapter, n in wave:
            handles.append((tiny_tokenizer.encode(text), adapter, n, submit(model, tiny_tokenizer.encode(text),
                                                                            adapter, greedy(n))))
        time.sleep(0.02)
    for prompt_ids, adapter, n, handle in handles:
        assert list(handle.result().token_ids) == peft_reference.generate(prompt_ids, adapter, n)


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode(PROMPTS[1])
    params = SamplingParams(max_new_tokens=16, temperature=1.2, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    alone = submit(model, prompt, "alpha", params).result().token_ids
    companions = [submit(model, tiny_tokenizer.encode(p), a, SamplingParams(max_new_tokens=20, temperature=1.0))
                  for p, a in zip(PROMPTS, ["beta", "", "gamma"], strict=False)]
    together = submit(model, prompt, "alpha", params).result().token_ids
    for c in companions:
        c.result()
    other_seed = submit(model, prompt, "alpha", SamplingParams(**{**params.__dict__, "seed": 99})).result()
    assert alone == together and len(alone) == 16
    assert other_seed.token_ids != alone


def test_stop_string_ends_the_request_and_is_not_emitted(model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode(PROMPTS[0])
    full = submit(model, prompt, "", greedy(30, ignore_eos=True)).result()
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = submit(model, prompt, "", greedy(30, ignore_eos=True, stop=(stop,))).result()
    assert cut.finish_reason == FinishReason.STOP_STRING
    assert cut.text == text[: text.index(stop)]


def test_cancel_frees_the_slot_for_a_waiting_request(model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode(PROMPTS[2])
    long = [submit(model, prompt, "", greedy(60, ignore_eos=True)) for _ in range(4)]  # all 4 KV slots
    waiting = submit(model, prompt, "gamma", greedy(3, ignore_eos=True))
    # What the engine looked like when it closed the waiting request, read on the engine's thread: the test
    # thread may be descheduled for many steps on a loaded host before it looks itself.
    at_close = {}
    close_waiting = waiting._close

    def close():
        at_close.update(steps=model.engine.steps, long_running=not any(h.finished.is_set() for h in long[1:]))
        close_waiting()

    waiting._close = close
    first = next(iter(long[0]))  # the batch is running
    assert first.finish_reason is None
    steps_at_cancel = model.engine.steps
    long[0].cancel()
    result = waiting.result()
    assert result.finish_reason == FinishReason.LENGTH and len(result.token_ids) == 3
    # The waiting request finished while the other long ones still ran (its slot came from the cancel).
    assert at_close["long_running"]
    assert list(long[0])[-1].finish_reason == FinishReason.CANCELLED
    assert at_close["steps"] - steps_at_cancel < 40
    for h in long[1:]:
        h.cancel()
    for h in long[1:]:
        assert list(h)[-1].finish_reason == FinishReason.CANCELLED
    deadline = time.monotonic() + 5
    while model.engine.scheduler.num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.engine.scheduler.num_free_slots == 4


def test_context_exhaustion_ends_with_length(model, tiny_tokenizer):
    ctx = model.runtime.ctx_len
    prompt = (tiny_tokenizer.encode(" ".join(["fox"] * 80)))[: ctx - 5]
    result = submit(model, prompt, "", greedy(50, ignore_eos=True)).result()
    assert result.finish_reason == FinishReason.LENGTH
    assert result.prompt_tokens + result.completion_tokens == ctx
    with pytest.raises(InvalidArgument) as err:
        submit(model, list(range(ctx)), "")
    assert str(ctx) in str(err.value)


def test_full_queue_is_resource_exhausted_and_unknown_adapter_not_found(model, tiny_tokenizer):
    # An engine whose loop is not started keeps its queue, so the bound is deterministic.
    engine = Engine(model.runtime, model.tokenizer, model_id="queue-test", max_waiting=2)
    prompt = tuple(tiny_tokenizer.encode(PROMPTS[0]))
    engine.submit(GenerationRequest(prompt, "alpha"))
    engine.submit(GenerationRequest(prompt, ""))
    with pytest.raises(ResourceExhausted):
        engine.submit(GenerationRequest(prompt, "alpha"))
    with pytest.raises(NotFound):
        engine.submit(GenerationRequest(prompt, "no-such-adapter"))
    engine.stop()
    assert model.runtime.slots[model.runtime.adapter_names()["alpha"]].active_requests == 0


def test_hot_added_adapter_serves_peft_tokens_and_bad_adapters_are_refused(tiny_artifact, tiny_adapters,
                                                                           tiny_tokenizer, peft_reference,
                                                                           tmp_path):
    artifact_dir, manifest = tiny_artifact
    model = open_model(artifact_dir, num_threads=1, model_id="hot", manifest=manifest)
    try:
        assert model.runtime.free_adapter_slots() == 1
        slot = model.runtime.load_adapter("hot", tiny_adapters["hot"])
        assert slot == 4 and model.runtime.free_adapter_slots() == 0
        prompt = tiny_tokenizer.encode(PROMPTS[3])
        got = submit(model, prompt, "hot", greedy(12)).result().token_ids
        assert list(got) == peft_reference.generate(prompt, "hot", 12)
        with pytest.raises(FailedPrecondition):
            model.runtime.load_adapter("hot", tiny_adapters["hot"])  # the name is taken
        # Every slot busy: a running request on each adapter blocks eviction.
        busy = [submit(model, prompt, a, greedy(60, ignore_eos=True)) for a in ("alpha", "beta", "gamma", "hot")]
        with pytest.raises(ResourceExhausted):
            model.runtime.load_adapter("again", tiny_adapters["hot"])
        for h in busy:
            h.cancel()
            list(h)
        # Idle now: the least recently used slot is reused, and the new name serves.
        model.runtime.load_adapter("again", tiny_adapters["alpha"])
        got = submit(model, prompt, "again", greedy(8)).result().token_ids
        assert list(got) == peft_reference.generate(prompt, "alpha", 8)
    finally:
        model.close()


def test_adapter_that_does_not_fit_is_refused_with_a_reason(model, tiny_llama, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    big = get_peft_model(base, LoraConfig(r=16, target_modules=["q_proj"], init_lora_weights=False))
    big.save_pretrained(tmp_path / "big")
    with pytest.raises(FailedPrecondition) as err:
        model.runtime.load_adapter("big", tmp_path / "big")
    assert "max_rank" in str(err.value) and err.value.field == "r"
    assert "big" not in model.runtime.adapter_names()


def test_engine_stop_cancels_what_is_left(tiny_artifact, tiny_tokenizer):
    artifact_dir, manifest = tiny_artifact
    m = open_model(artifact_dir, num_threads=1, model_id="stop", manifest=manifest)
    # Steps after the first wait for the engine's stop: on a loaded host the tiny model could otherwise run all
    # 60 tokens before close() reaches it (the request then ends by length, not cancelled).
    with steps_held_after_first(m.runtime, m.engine._stop):
        h = submit(m, tiny_tokenizer.encode(PROMPTS[0]), "", greedy(60, ignore_eos=True))
        next(iter(h))
        t = threading.Thread(target=m.close)
        t.start()
        t.join(10)
    assert list(h)[-1].finish_reason == FinishReason.CANCELLED and not m.engine.running


def _overflowing_adapter(source, out):
    """A copy of ``source`` whose lora_B is finite but 1e30 times larger: it passes every load check
    and overflows to inf/NaN inside the graph (the "slipped through" case)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    shutil.copytree(source, out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: (v * np.float32(1e30) if "lora_B" in k else v) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    return out


def test_a_nan_producing_request_fails_alone_and_the_rest_of_its_step_goes_on(tiny_artifact, tiny_adapters,
                                                                             tiny_tokenizer, peft_reference,
                                                                             tmp_path):
    from services.inference.runtime import OrtRuntime

    artifact_dir, manifest = tiny_artifact
    runtime = OrtRuntime(artifact_dir, manifest, num_threads=1)
    runtime.load_adapter("boom", _overflowing_adapter(tiny_adapters["hot"], tmp_path / "boom"))
    engine = Engine(runtime, tiny_tokenizer, model_id="nan-isolation")
    prompt = tiny_tokenizer.encode(PROMPTS[0])
    expected = peft_reference.generate(prompt, "", 12)
    try:
        # Queued before the loop starts, so the first prefill step holds the greedy row and a NaN row.
        good = engine.submit(GenerationRequest(tuple(prompt), "", greedy(12), "good"))
        sampled = engine.submit(GenerationRequest(tuple(prompt), "boom", SamplingParams(temperature=1.0, seed=1),
                                                  "boom-sampled"))
        greedy_bad = engine.submit(GenerationRequest(tuple(prompt), "boom", greedy(12), "boom-greedy"))
        engine.start()
        assert list(good.result().token_ids) == expected
        for handle in (sampled, greedy_bad):
            with pytest.raises(FailedPrecondition) as err:
                handle.result()
            assert err.value.reason == "NON_FINITE_LOGITS"
            assert handle.request_id in str(err.value) and "'boom'" in str(err.value)
            assert err.value.metadata["adapter"] == "boom"
        assert engine.num_active() == 0 and runtime.slots[runtime.adapter_names()["boom"]].active_requests == 0
        # The failed requests' slots (and their zeroed caches) serve new requests exactly.
        again = [engine.submit(GenerationRequest(tuple(prompt), "", greedy(12))) for _ in range(4)]
        assert [list(h.result().token_ids) for h in again] == [expected] * 4
    finally:
        engine.stop()
        runtime.close()


def test_request_id_is_bounded_and_of_a_safe_charset(model):
    for bad in ("x" * 129, "x" * 1_000_000, "a b", "id\n", "ünï"):
        with pytest.raises(InvalidArgument) as err:
            GenerationRequest((1, 2), request_id=bad)
        assert err.value.field == "request_id" and len(str(err.value)) < 300
    assert submit(model, [1, 2, 3], request_id="job:42/a-1_b.c@x+y").result().request_id == "job:42/a-1_b.c@x+y"


def test_an_idle_engine_prefills_requests_submitted_back_to_back_as_one_call(tiny_artifact, tiny_tokenizer,
                                                                           monkeypatch):
    # Wider windows than the defaults, and gaps between submissions that the engine thread would otherwise
    # use to start the first request alone: the test does not depend on the host's scheduling.
    monkeypatch.setattr(engine_module, "_ADMISSION_GAP_S", 0.2)
    monkeypatch.setattr(engine_module, "_ADMISSION_MAX_S", 5.0)
    artifact_dir, manifest = tiny_artifact
    m = open_model(artifact_dir, num_threads=1, model_id="admission", manifest=manifest)
    calls = []
    execute = m.runtime.execute
    m.runtime.execute = lambda step: (calls.append((step.kind, [len(r.token_ids) for r in step.rows])),
                                      execute(step))[1]
    try:
        # Longer than one chunk: with nothing decoding, each goes in whole (the runtime's idle limit); one
        # more prompt than the artifact has KV slots.
        prompts = [tiny_tokenizer.encode(p * 3) for p in PROMPTS + ["add 4 and 1 ->"]]
        assert len(prompts) > m.runtime.full_batch_size
        assert all(m.runtime.prefill_seq_len < len(p) <= m.runtime.idle_prefill_seq_len for p in prompts)
        handles = []
        for p in prompts:  # row by row, as GenerateBatch does
            handles.append(submit(m, p, "", greedy(3)))
            time.sleep(0.02)
        for h in handles:
            h.result()
    finally:
        m.close()
    # The first call holds every prompt that got a KV slot (an ONNX Runtime graph takes any batch of rows;
    # the artifact's batch_size = 2 is the AI 100 prefill specialisation's), whole.
    rows = m.runtime.max_prefill_rows
    assert rows == m.runtime.full_batch_size
    assert 1 < rows < len(prompts)
    assert calls[0] == ("prefill", [len(p) for p in prompts[:rows]])


def test_a_default_compiled_artifact_prefills_every_waiting_row_in_one_call(tiny_llama, tiny_adapters, tiny_tokenizer,
                                                                           peft_reference, tmp_path, monkeypatch):
    # Compiled the way QEfficient's README does: full_batch_size only (batch_size resolves to 1). The engine
    # still prefills all waiting rows that hold a KV slot in one call, and each row equals PEFT.
    from services.compiler.artifact import build_artifact
    from services.compiler.options import CompileOptions

    monkeypatch.setattr(engine_module, "_ADMISSION_GAP_S", 0.2)
    monkeypatch.setattr(engine_module, "_ADMISSION_MAX_S", 5.0)
    manifest = build_artifact(tiny_llama, [("alpha", tiny_adapters["alpha"]), ("beta", tiny_adapters["beta"])],
                              CompileOptions(full_batch_size=4), tmp_path / "default")
    assert manifest.options["batch_size"] == 1 and manifest.options["full_batch_size"] == 4
    m = open_model(tmp_path / "default", num_threads=1, model_id="default-compiled", manifest=manifest)
    calls = []
    execute = m.runtime.execute
    m.runtime.execute = lambda step: (calls.append((step.kind, step.num_rows)), execute(step))[1]
    rows = [(PROMPTS[0], ""), (PROMPTS[1], "alpha"), (PROMPTS[2], "beta"), (PROMPTS[3], "alpha")]
    try:
        ids = [tiny_tokenizer.encode(p) for p, _ in rows]
        handles = []
        for prompt_ids, (_, adapter) in zip(ids, rows, strict=True):
            handles.append(submit(m, prompt_ids, adapter, greedy(5)))
            time.sleep(0.02)
        results = [h.result() for h in handles]
    finally:
        m.close()
    assert calls[0] == ("prefill", 4)
    assert sum(1 for kind, _ in calls if kind == "prefill") == 1
    for prompt_ids, (_, adapter), result in zip(ids, rows, results, strict=True):
        assert list(result.token_ids) == peft_reference.generate(prompt_ids, adapter, 5), adapter


def test_rows_moved_down_into_freed_kv_slots_keep_equal_to_peft_and_newcomers_prefill_together(
        tiny_artifact, tiny_tokenizer, peft_reference):
    # 4 KV slots: two short requests free slots 0 and 2 while the long ones in 1 and 3 decode; the scheduler
    # moves slot 3's row (its cached tokens) into slot 0, so two newcomers take slots 2 and 3 and prefill in one
    # call. Every request's greedy tokens equal PEFT's, the moved ones included.
    artifact_dir, manifest = tiny_artifact
    m = open_model(artifact_dir, num_threads=1, model_id="compact", manifest=manifest)
    assert m.runtime.compacts_kv_slots
    steps, holding, sent = [], threading.Event(), threading.Event()
    execute = m.runtime.execute

    def held(step):
        steps.append(step)
        if not sent.is_set() and m.engine.scheduler.num_free_slots >= 2:
            holding.set()
            sent.wait(30)
        return execute(step)

    m.runtime.execute = held
    first = [(PROMPTS[0], "", 2), (PROMPTS[1], "alpha", 14), (PROMPTS[2], "beta", 2), (PROMPTS[3], "gamma", 14)]
    later = [(PROMPTS[1] + " x", "beta", 5), (PROMPTS[0] + " y", "alpha", 5)]
    try:
        handles = [(text, adapter, n, submit(m, tiny_tokenizer.encode(text), adapter, greedy(n)))
                   for text, adapter, n in first]
        assert holding.wait(30)
        handles += [(text, adapter, n, submit(m, tiny_tokenizer.encode(text), adapter, greedy(n)))
                    for text, adapter, n in later]
        sent.set()
        results = [(text, adapter, n, h.result()) for text, adapter, n, h in handles]
    finally:
        sent.set()
        m.close()
    for text, adapter, n, result in results:
        assert list(result.token_ids) == peft_reference.generate(tiny_tokenizer.encode(text), adapter, n), text
    assert any(step.moves for step in steps)
    later_ids = {res.request_id for _, _, _, res in results[4:]}
    firsts = [s for s in steps if s.kind == "prefill" and {r.request_id for r in s.rows} & later_ids]
    assert {r.request_id for r in firsts[0].rows} == later_ids
    assert sorted(r.slot for r in firsts[0].rows) == [2, 3]
