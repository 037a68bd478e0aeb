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


def test_sentencepiece_style_word_start_spaces_are_kept():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(["hello world again and again", "the end of the world"] * 4,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=byte_tokens, show_progress=False))

    def decode(ids):
        return tok.decode(list(ids), skip_special_tokens=False)

    prompt = tok.encode("hello").ids
    out = tok.encode("hello world again é").ids[len(prompt):]
    # "é" is not in the vocabulary: it comes as two byte-fallback tokens, the first one incomplete.
    d = IncrementalDetokenizer(decode, prompt)
    chunks = [d.add(t) for t in out] + [d.finish()]
    expected = decode(prompt + out)[len(decode(prompt)):]
    assert "".join(chunks) == expected == " world again é"
    assert "" in chunks  # the first byte of "é" was held back
