"""Incremental text: multi-byte characters held back, spaces kept, stop strings cut across chunks."""

from __future__ import annotations

from services.inference.detokenizer import IncrementalDetokenizer


def stream(tok, prompt_ids, out_ids, stop=()):
    d = IncrementalDetokenizer(tok.decode, prompt_ids, stop)
    chunks = [d.add(t) for t in out_ids]
    chunks.append(d.finish())
    return chunks, d


def test_stream_equals_full_decode_with_multibyte_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = tok.encode("reverse the word:")
    text = " héllo wörld — ünïcode ✓ 日本語 quick"
    # Byte-level pieces: feed one token per byte-ish piece, including tokens that split characters.
    out = tok.encode(text, add_special_tokens=False)
    chunks, _ = stream(tok, prompt, out)
    assert "".join(chunks) == tok.decode(out) == text
    assert all("\ufffd" not in c for c in chunks)
    # Token by token over raw single bytes: "日" is 3 bytes -> 3 tokens, text appears only when complete.
    vocab = tok._tok.get_vocab()
    byte_tokens = [vocab[c] for c in "æĹ¥"]  # byte-level symbols of b"\xe6\x97\xa5" (日)
    chunks, _ = stream(tok, prompt, byte_tokens)
    assert chunks[:2] == ["", ""] and "".join(chunks) == "日"


def test_stop_string_across_chunks_is_not_emitted(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tok.encode("the quick brown fox jumps", add_special_tokens=False)
    chunks, d = stream(tok, tok.encode("a"), out, stop=("brown f",))
    assert "".join(chunks) == "the quick " and d.stopped
    # Nothing that could begin a stop string was shown before the match was decided.
    assert all("brown" not in c for c in chunks)


def test_special_tokens_are_skipped(tiny_tokenizer):
    tok = tiny_tokenizer
    out = tok.encode("add 2", add_special_tokens=False) + sorted(tok.eos_ids)
    chunks, _ = stream(tok, [], out)
    assert "".join(chunks) == "add 2"
