"""The scheduler alone: admission, chunked prefill, decode batches, finish and slot reuse."""

from __future__ import annotations

import pytest

from loraflow.artifact.scheduler import FinishReason, Scheduler, Sequence, Status
from loraflow.errors import InvalidArgument, ResourceExhausted


def make(**kw) -> Scheduler:
    args = dict(full_batch_size=2, prefill_seq_len=4, ctx_len=32, max_waiting=3)
    args.update(kw)
    return Scheduler(**args)


def run_step(s: Scheduler, token: int = 7):
    out = s.schedule()
    sampled = {r.request_id: token for r in out.rows if r.samples}
    return out, s.update(out, sampled)


def test_chunked_prefill_then_decode_with_positions_slots_and_adapters():
    s = make()
    s.add(Sequence("a", list(range(10, 20)), lora_id=3, max_new_tokens=5))  # 10 tokens: chunks 4, 4, 2
    s.add(Sequence("b", [1, 2], lora_id=0, max_new_tokens=5))
    out = s.schedule()
    assert out.kind == "prefill" and out.seq_len == 4
    a, b = out.rows
    assert (a.slot, a.lora_id, a.token_ids, a.start_position, a.samples) == (0, 3, (10, 11, 12, 13), 0, False)
    assert (b.slot, b.token_ids, b.samples) == (1, (1, 2), True)
    ids, pos = out.padded_inputs()
    assert pos[1] == [0, 1, -1, -1] and ids[1][:2] == [1, 2]
    s.update(out, {"b": 5})
    out = s.schedule()  # b is ready: a decode step for it comes between a's prefill chunks
    assert out.kind == "decode" and [(r.request_id, r.token_ids, r.start_position) for r in out.rows] == \
        [("b", (5,), 2)]
    s.update(out, {"b": 6})
    out = s.schedule()  # then a's second chunk
    assert out.kind == "prefill" and [r.request_id for r in out.rows] == ["a"]
    assert out.rows[0].start_position == 4 and out.past_len == 4
    s.update(out, {})
    s.update(s.schedule(), {"b": 7})  # decode b again
    out = s.schedule()
    assert out.rows[0].token_ids == (18, 19) and out.rows[0].samples and out.seq_len == 2
    s.update(out, {"a": 8})
    out = s.schedule()
    assert out.kind == "decode" and out.seq_len == 1
    rows = {r.request_id: r for r in out.rows}
    assert rows["a"].token_ids == (8,) and rows["a"].start_position == 10 and rows["a"].lora_id == 3
    assert rows["b"].token_ids == (7,) and rows["b"].start_position == 4
    assert out.past_len == 10


def test_queue_full_is_resource_exhausted_and_bad_prompts_are_invalid():
    s = make(max_waiting=2)
    s.add(Sequence("a", [1]))
    s.add(Sequence("b", [1]))
    with pytest.raises(ResourceExhausted):
        s.add(Sequence("c", [1]))
    with pytest.raises(InvalidArgument) as err:
        make().add(Sequence("d", [1] * 32))
    assert "32" in str(err.value) and err.value.field == "prompt"
    with pytest.raises(InvalidArgument):
        make().add(Sequence("e", []))


def test_finished_request_frees_its_slot_for_a_waiting_one_at_once():
    s = make(full_batch_size=1)
    s.add(Sequence("a", [1, 2], max_new_tokens=2))
    s.add(Sequence("b", [3], max_new_tokens=1))
    run_step(s)  # prefill a -> token 1
    assert s.num_waiting == 1
    _, touched = run_step(s)  # decode a -> token 2: done
    assert touched[0].finish_reason == FinishReason.LENGTH and s.num_free_slots == 1
    out = s.schedule()
    assert out.kind == "prefill" and out.rows[0].request_id == "b" and out.rows[0].slot == 0


def test_eos_stops_unless_ignored_and_context_exhaustion_is_length():
    s = make()
    s.add(Sequence("a", [1], eos_ids=frozenset({9}), max_new_tokens=10))
    s.add(Sequence("b", [1], eos_ids=frozenset({9}), ignore_eos=True, max_new_tokens=10))
    _, touched = run_step(s, token=9)
    reasons = {q.request_id: q.finish_reason for q in touched}
    assert reasons == {"a": FinishReason.STOP, "b": None}
    s2 = make(ctx_len=4)
    s2.add(Sequence("c", [1, 2], max_new_tokens=100))
    run_step(s2)
    _, touched = run_step(s2)
    assert touched[0].finish_reason == FinishReason.LENGTH and touched[0].num_tokens == 4


def test_abort_frees_slot_and_update_ignores_aborted_rows():
    s = make(full_batch_size=1)
    s.add(Sequence("a", [1, 2, 3]))
    s.add(Sequence("w", [1]))
    out = s.schedule()
    aborted = s.abort("a")
    assert aborted.status == Status.FINISHED and aborted.finish_reason == FinishReason.CANCELLED
    assert s.update(out, {"a": 4}) == [] and s.num_free_slots == 1
    assert s.abort("w").finish_reason == FinishReason.CANCELLED and not s.has_work()
    assert s.schedule() is None


def test_staggered_arrivals_keep_each_request_on_its_own_slot_and_positions():
    s = make(full_batch_size=2, prefill_seq_len=8)
    s.add(Sequence("a", [1, 2, 3], max_new_tokens=3))
    run_step(s)  # prefill a
    s.add(Sequence("b", [4], max_new_tokens=2))
    out, _ = run_step(s)  # a decodes first (the last call was a prefill) ...
    assert out.kind == "decode" and [(r.request_id, r.start_position) for r in out.rows] == [("a", 3)]
    out = s.schedule()  # ... then b's prefill runs before a's next decode
    assert out.kind == "prefill" and [r.request_id for r in out.rows] == ["b"] and out.rows[0].slot == 1
    s.update(out, {"b": 8})
    out = s.schedule()
    assert {(r.request_id, r.start_position) for r in out.rows} == {("a", 4), ("b", 1)}


def test_idle_prefill_takes_longer_chunks_only_while_no_row_decodes():
    s = make(prefill_seq_len=4, idle_prefill_seq_len=12, full_batch_size=3)
    s.add(Sequence("a", list(range(100, 110)), lora_id=1, max_new_tokens=4))  # 10 tokens
    s.add(Sequence("b", list(range(200, 215)), lora_id=2, max_new_tokens=4))  # 15 tokens
    out, _ = run_step(s)  # nothing decodes: up to 12 tokens per row
    assert out.kind == "prefill" and [len(r.token_ids) for r in out.rows] == [10, 12]
    assert [r.samples for r in out.rows] == [True, False]
    out, _ = run_step(s)  # a decodes first (prefill and decode alternate)
    assert out.kind == "decode" and [r.request_id for r in out.rows] == ["a"]
    s.add(Sequence("c", list(range(300, 310)), lora_id=0, max_new_tokens=4))
    out, _ = run_step(s)  # a is decoding: b's rest and the newcomer c get the 4-token bound
    assert out.kind == "prefill" and {r.request_id: len(r.token_ids) for r in out.rows} == {"b": 3, "c": 4}


def test_idle_prefill_shorter_than_a_chunk_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as info:
        make(prefill_seq_len=8, idle_prefill_seq_len=4)
    assert info.value.field == "idle_prefill_seq_len" and info.value.value == 4


def test_by_default_prefill_takes_every_waiting_row_that_holds_a_kv_slot():
    # No max_prefill_rows (what an ONNX Runtime artifact gives whatever batch_size it was compiled with):
    # eight waiting requests over eight KV slots prefill in one call, the ninth waits for a slot.
    s = make(full_batch_size=8, max_waiting=16)
    for i in range(9):
        s.add(Sequence(f"r{i}", [1 + i, 2, 3], max_new_tokens=2))
    out = s.schedule()
    assert out.kind == "prefill" and [r.request_id for r in out.rows] == [f"r{i}" for i in range(8)]
    assert sorted(r.slot for r in out.rows) == list(range(8)) and s.num_waiting == 1
    # An explicit bound (an AI 100 prefill specialisation of batch_size rows) still splits the calls.
    s = make(full_batch_size=8, max_waiting=16, max_prefill_rows=2)
    for i in range(8):
        s.add(Sequence(f"r{i}", [1 + i, 2, 3], max_new_tokens=2))
    assert [r.request_id for r in s.schedule().rows] == ["r0", "r1"]


def _admitted(s: Scheduler) -> list[str]:
    """Request ids in the order schedule() admits them this step."""
    before = set(s.running)
    s.schedule()
    return [rid for rid in s.running if rid not in before]


def _finish_all(s: Scheduler) -> None:
    for rid in list(s.running):
        s.finish(rid, FinishReason.STOP)


def test_a_request_waiting_on_its_adapters_load_holds_no_slot_and_resident_ones_pass_it():
    s = make(full_batch_size=2, max_waiting=8)
    s.add(Sequence("cold", [1], lora_id=None))  # its adapter is being loaded
    s.add(Sequence("hot", [1], lora_id=3))
    s.add(Sequence("base", [1], lora_id=0))
    assert _admitted(s) == ["hot", "base"]  # the cold load blocks neither
    assert [q.request_id for q in s.waiting] == ["cold"] and s.num_free_slots == 0
    _finish_all(s)
    assert _admitted(s) == []  # a free slot, but its adapter is not loaded yet
    assert s.adapter_ready("cold", 5) and not s.adapter_ready("gone", 5)
    assert _admitted(s) == ["cold"] and s.running["cold"].lora_id == 5
    s.add(Sequence("aborted", [1], lora_id=None))
    s.abort("aborted")
    assert not s.adapter_ready("aborted", 6)  # its load finished after it left: nothing to admit


def test_the_requests_of_one_adapter_are_admitted_together():
    s = make(full_batch_size=4, max_waiting=8)
    for rid, lora in (("a1", 1), ("b1", 2), ("a2", 1), ("c1", 3), ("a3", 1)):
        s.add(Sequence(rid, [1], lora_id=lora))
    assert _admitted(s) == ["a1", "a2", "a3", "b1"]  # a's group, then the oldest left
    assert s.running["b1"].bypassed == 2  # jumped by a2 and a3 (both arrived after it)
    assert s.waiting[0].request_id == "c1" and s.waiting[0].bypassed == 1  # by a3 only
    # Three requests that waited on one load start together once it is done, past nothing older.
    _finish_all(s)
    s.schedule()  # c1
    for rid in ("x1", "x2", "x3"):
        s.add(Sequence(rid, [1], lora_id=None))
    s.add(Sequence("y1", [1], lora_id=4))
    assert _admitted(s) == ["y1"]
    for rid in ("x1", "x2", "x3"):
        s.adapter_ready(rid, 6)
    _finish_all(s)
    assert _admitted(s) == ["x1", "x2", "x3"]


def test_grouping_jumps_a_waiting_request_at_most_max_bypasses_times():
    from loraflow.artifact.scheduler import MAX_BYPASSES

    s = make(full_batch_size=MAX_BYPASSES + 4, max_waiting=64)
    s.add(Sequence("hot0", [1], lora_id=1))
    s.add(Sequence("other", [1], lora_id=2))
    for i in range(1, MAX_BYPASSES + 6):
        s.add(Sequence(f"hot{i}", [1], lora_id=1))
    admitted = _admitted(s)
    # hot0 (the oldest), then MAX_BYPASSES of its group jump "other"; the next would exceed the bound, so
    # "other" goes first and the rest of the group follows in order.
    assert admitted[:MAX_BYPASSES + 2] == ["hot0"] + [f"hot{i}" for i in range(1, MAX_BYPASSES + 1)] + ["other"]
    assert s.running["other"].bypassed == MAX_BYPASSES
    assert admitted[MAX_BYPASSES + 2:] == [f"hot{i}" for i in range(MAX_BYPASSES + 1, MAX_BYPASSES + 3)]


def test_compact_slots_moves_running_rows_down_so_the_next_admitted_are_adjacent():
    s = make(full_batch_size=4, max_waiting=8, compact_slots=True)
    for rid, prompt in (("a", [1, 2]), ("b", [3]), ("c", [4, 5, 6]), ("d", [7])):
        s.add(Sequence(rid, prompt, max_new_tokens=8))
    out, _ = run_step(s)
    assert out.moves == () and [(r.request_id, r.slot) for r in out.rows] == [("a", 0), ("b", 1), ("c", 2), ("d", 3)]
    s.finish("a", FinishReason.STOP)
    s.finish("c", FinishReason.STOP)  # free slots 0 and 2: not one range
    s.add(Sequence("e", [8, 9, 10], max_new_tokens=8))
    s.add(Sequence("f", [11, 12], max_new_tokens=8))
    out = s.schedule()
    # d (slot 3) moves into slot 0, the lowest free, keeping its positions and tokens; b stays; this step decodes
    # them (the last call was a prefill) and e and f, admitted into slots 2 and 3, side by side, prefill next.
    assert out.moves == ((3, 0),) and out.kind == "decode"
    assert [(r.request_id, r.slot, r.start_position, r.token_ids) for r in out.rows] == \
        [("d", 0, 1, (7,)), ("b", 1, 1, (7,))]
    s.update(out, {"d": 5, "b": 6})
    out = s.schedule()
    assert out.moves == () and out.kind == "prefill"
    assert [(r.request_id, r.slot, r.start_position) for r in out.rows] == [("e", 2, 0), ("f", 3, 0)]
    assert s.slots == ["d", "b", "e", "f"] and s.running["d"].slot == 0


def test_compact_slots_keeps_rows_that_have_not_started_next_to_the_newly_admitted():
    # a, b, c decode in slots 0-2; d is admitted into slot 3 during a decode step (the last call was a prefill) and
    # waits for its prefill; a finishes, freeing slot 0 below it. Moving d down into slot 0 would part it from e,
    # admitted next into slot 3: two prefill calls. Instead c (cached tokens: a move) fills slot 0, and d, with
    # nothing cached, is seated again right above the started rows, next to e.
    s = make(full_batch_size=5, max_waiting=8, compact_slots=True)
    for rid in "abc":
        s.add(Sequence(rid, [1, 2], max_new_tokens=8))
    run_step(s)  # a, b, c prefill together
    s.add(Sequence("d", [3, 4, 5], max_new_tokens=8))
    out, _ = run_step(s)
    assert out.kind == "decode" and [r.request_id for r in out.rows] == ["a", "b", "c"] and s.slots[3] == "d"
    s.finish("a", FinishReason.STOP)
    s.add(Sequence("e", [6, 7], max_new_tokens=8))
    out = s.schedule()
    assert out.moves == ((2, 0),) and out.kind == "prefill"
    assert [(r.request_id, r.slot, r.start_position) for r in out.rows] == [("d", 2, 0), ("e", 3, 0)]
    assert s.slots == ["c", "b", "d", "e", None]
    s.update(out, {"d": 9, "e": 9})
    out = s.schedule()  # the decode's slot range 0-3 holds every decoding row and no other
    assert out.kind == "decode" and [(r.request_id, r.slot) for r in out.rows] == \
        [("c", 0), ("b", 1), ("d", 2), ("e", 3)]


def test_without_compact_slots_rows_stay_where_they_were_admitted():
    s = make(full_batch_size=3, max_waiting=8)
    for rid in "abc":
        s.add(Sequence(rid, [1], max_new_tokens=8))
    run_step(s)
    s.finish("a", FinishReason.STOP)
    s.add(Sequence("d", [2, 3], max_new_tokens=8))
    out = s.schedule()  # b and c decode where they are
    assert out.moves == () and [(r.request_id, r.slot) for r in out.rows] == [("b", 1), ("c", 2)]
    s.update(out, {"b": 4, "c": 4})
    out = s.schedule()
    assert out.moves == () and [(r.request_id, r.slot) for r in out.rows] == [("d", 0)]


def test_a_prefill_token_budget_takes_whole_prompts_next_to_decoding_rows():
    s = make(full_batch_size=5, max_waiting=8, prefill_seq_len=4, idle_prefill_seq_len=12, prefill_token_budget=20)
    s.add(Sequence("a", [1, 2], max_new_tokens=8))
    run_step(s)  # a's prefill: a decodes from now on
    for rid, n in (("b", 9), ("c", 10), ("d", 3), ("e", 15)):
        s.add(Sequence(rid, list(range(100, 100 + n)), max_new_tokens=8))
    out, _ = run_step(s)
    assert out.kind == "decode" and [r.request_id for r in out.rows] == ["a"]
    out, _ = run_step(s)
    # Whole prompts (not 4-token chunks) while 2 rows x 10 tokens fit the budget; d would make it 3 x 10.
    assert out.kind == "prefill" and [(r.request_id, len(r.token_ids), r.samples) for r in out.rows] == \
        [("b", 9, True), ("c", 10, True)]
    assert out.seq_len == 10
    out, _ = run_step(s)
    assert out.kind == "decode" and [r.request_id for r in out.rows] == ["a", "b", "c"]
    out, _ = run_step(s)  # e's 12-token chunk beside d would pad to 2 x 12 > 20: d goes alone
    assert [(r.request_id, len(r.token_ids)) for r in out.rows] == [("d", 3)]
    run_step(s)
    out, _ = run_step(s)  # one row always goes, up to the idle limit
    assert [(r.request_id, len(r.token_ids), r.samples) for r in out.rows] == [("e", 12, False)]
    run_step(s)
    out, _ = run_step(s)
    assert [(r.request_id, r.token_ids, r.start_position) for r in out.rows] == [("e", (112, 113, 114), 12)]


def test_a_prefill_token_budget_below_a_chunk_is_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as info:
        make(prefill_seq_len=8, prefill_token_budget=7)
    assert info.value.field == "prefill_token_budget" and info.value.value == 7
