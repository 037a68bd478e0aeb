"""The torch-free tokenizer agrees with transformers' on ids, decoding, chat template and EOS."""

from __future__ import annotations

from transformers import AutoTokenizer


def test_matches_transformers(tiny_llama, tiny_tokenizer):
    ref = AutoTokenizer.from_pretrained(tiny_llama)
    for text in ("the quick brown fox", "héllo wörld ✓ 日本語", "add 2 and 3 -> 5"):
        assert tiny_tokenizer.encode(text) == ref(text)["input_ids"]
        ids = ref(text)["input_ids"]
        assert tiny_tokenizer.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "reverse the word: hello"}]
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):
        expected = expected["input_ids"]
    assert tiny_tokenizer.encode_chat("reverse the word: hello") == list(expected)
    assert tiny_tokenizer.eos_ids == frozenset({ref.convert_tokens_to_ids("<|im_end|>")})


def test_the_chat_template_is_compiled_once_and_renders_each_request_afresh(tiny_llama, monkeypatch):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from services.inference.tokenization import TextTokenizer

    compiled = []
    from_string = ImmutableSandboxedEnvironment.from_string
    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string",
                        lambda self, source, *a, **k: compiled.append(source) or from_string(self, source, *a, **k))
    tokenizer = TextTokenizer(tiny_llama)
    first = tokenizer.apply_chat_template([{"role": "user", "content": "one"}])
    second = tokenizer.apply_chat_template([{"role": "user", "content": "two"}])
    assert len(compiled) == 1
    assert "one" in first and "two" in second and "one" not in second
