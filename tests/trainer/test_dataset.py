"""Dataset parsing, validation, masking and splitting (no model weights needed: only the tiny tokenizer)."""

from __future__ import annotations

import json

import pytest

from loraflow.errors import InvalidArgument
from services.trainer.dataset import (
    IGNORE_INDEX,
    build_splits,
    parse_jsonl,
    read_jsonl,
    split_indices,
    tokenize_record,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _lines(*objs) -> str:
    return "\n".join(o if isinstance(o, str) else json.dumps(o) for o in objs)


def _trained_text(tokenizer, example) -> str:
    # Labels mark the tokens the loss reads; decode exactly those.
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_prompt_completion_loss_only_on_completion(tokenizer):
    rec = parse_jsonl(_lines({"prompt": "add 2 and 3 ->", "completion": " 5"}))[0]
    ex = tokenize_record(tokenizer, rec, 512)
    assert len(ex.input_ids) == len(ex.labels)
    assert _trained_text(tokenizer, ex) == " 5" + tokenizer.eos_token
    prompt_len = len(tokenizer("add 2 and 3 ->", add_special_tokens=False)["input_ids"])
    assert all(x == IGNORE_INDEX for x in ex.labels[:prompt_len])
    assert tokenizer.decode(list(ex.input_ids)) == "add 2 and 3 -> 5" + tokenizer.eos_token


def test_messages_loss_only_on_assistant_turns(tokenizer):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "olleh"}, {"role": "user", "content": "fox"},
            {"role": "assistant", "content": "xof"}]
    ex = tokenize_record(tokenizer, parse_jsonl(_lines({"messages": msgs}))[0], 512)
    trained = _trained_text(tokenizer, ex)
    assert "olleh<|im_end|>" in trained and "xof<|im_end|>" in trained
    for not_trained in ("be brief", "hello", "fox", "assistant", "user", "<|im_start|>"):
        assert not_trained not in trained
    # The whole conversation is the chat template's rendering.
    assert tokenizer.decode(list(ex.input_ids)) == tokenizer.apply_chat_template(msgs, tokenize=False)


def test_text_loss_on_all_tokens(tokenizer):
    ex = tokenize_record(tokenizer, parse_jsonl(_lines({"text": "the quick brown fox"}))[0], 512)
    assert list(ex.labels) == list(ex.input_ids)
    assert ex.num_loss_tokens == len(ex.input_ids) - 1


def test_truncation_to_max_seq_len(tokenizer):
    ex = tokenize_record(tokenizer, parse_jsonl(_lines({"text": "a b c d e f g h i j k l m n o p"}))[0], 5)
    assert len(ex.input_ids) == len(ex.labels) == 5


def test_examples_without_loss_tokens_after_truncation_are_dropped(tokenizer):
    recs = parse_jsonl(_lines({"prompt": "the quick brown fox jumps over", "completion": " dog"},
                              {"text": "hello world"}))
    splits = build_splits(tokenizer, recs, max_seq_len=4, eval_fraction=0, seed=0)
    assert splits.dropped == 1 and len(splits.train) == 1
    with pytest.raises(InvalidArgument) as e:
        build_splits(tokenizer, recs[:1], max_seq_len=4, eval_fraction=0, seed=0)
    assert e.value.field == "training.max_seq_len"


def test_eval_split_is_seeded_and_disjoint():
    train, ev = split_indices(20, 0.2, seed=3)
    assert len(ev) == 4 and sorted(train + ev) == list(range(20))
    assert split_indices(20, 0.2, seed=3) == (train, ev)
    assert split_indices(20, 0.2, seed=4) != (train, ev)
    assert split_indices(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    assert len(split_indices(2, 0.5, seed=0)[0]) == 1  # eval never takes everything


@pytest.mark.parametrize(("text", "line", "field_part"), [
    (_lines({"text": "ok"}, "{not json"), 2, "json"),
    (_lines({"text": "ok"}, "[1, 2]"), 2, "json"),
    (_lines({"prompt": "x"}), 1, "keys"),
    (_lines({"prompt": "x", "completion": "y", "extra": 1}), 1, "keys"),
    (_lines({"prompt": 3, "completion": "y"}), 1, "prompt"),
    (_lines({"prompt": "x", "completion": ""}), 1, "completion"),
    (_lines({"text": ""}), 1, "text"),
    (_lines({"text": None}), 1, "text"),
    (_lines({"messages": []}), 1, "messages"),
    (_lines({"messages": "hi"}), 1, "messages"),
    (_lines({"messages": [{"role": "user", "content": "hi"}]}), 1, "messages"),
    (_lines({"messages": [{"role": "wizard", "content": "hi"}]}), 1, "messages[0].role"),
    (_lines({"messages": [{"role": "assistant"}]}), 1, "messages[0]"),
    (_lines({"messages": [{"role": "assistant", "content": 5}]}), 1, "messages[0].content"),
    (_lines({"text": "a"}, "", {"text": "b"}, '"just a string"'), 4, "json"),
])
def test_bad_lines_name_line_and_field(text, line, field_part):
    with pytest.raises(InvalidArgument) as e:
        parse_jsonl(text)
    assert e.value.field == f"dataset line {line}: {field_part}"
    assert f"line {line}" in str(e.value)


def test_empty_dataset_rejected(tmp_path):
    for data in ("", "\n\n  \n"):
        with pytest.raises(InvalidArgument, match="empty") as e:
            parse_jsonl(data)
        assert e.value.field == "dataset_uri"
    with pytest.raises(InvalidArgument, match="not UTF-8"):
        parse_jsonl(b"\xff\xfe{}")
    with pytest.raises(InvalidArgument, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "d.jsonl").write_text(_lines({"text": "a"}, {"prompt": "p", "completion": "c"}))
    assert [r.kind for r in read_jsonl(tmp_path / "d.jsonl")] == ["text", "prompt_completion"]


def test_prompts_start_with_the_tokens_the_tokenizer_itself_adds(tiny_llama):
    """Training encodes a prompt as the inference service does (add_special_tokens=True): a BOS only
    when the tokenizer's own post-processor adds one, not whenever a bos_token is configured."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_llama, bos_token="<|im_start|>")
    bos_id = plain.convert_tokens_to_ids("<|im_start|>")
    record = parse_jsonl(b'{"prompt": "add 2 and 3", "completion": " 5"}\n')[0]
    assert plain.bos_token_id == bos_id
    assert tokenize_record(plain, record, 64).input_ids[0] != bos_id  # configured, but never added

    with_bos = AutoTokenizer.from_pretrained(tiny_llama)
    with_bos._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[
        ("<|im_start|>", bos_id)])
    example = tokenize_record(with_bos, record, 64)
    assert example.input_ids[0] == bos_id and example.labels[0] == -100
    prompt = with_bos("add 2 and 3", add_special_tokens=False)["input_ids"]
    assert list(example.input_ids[1:1 + len(prompt)]) == prompt
    assert example.input_ids[-1] == with_bos.eos_token_id
