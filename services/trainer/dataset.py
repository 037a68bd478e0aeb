"""JSONL training data: parse and validate every line, tokenize with loss masks, split off an eval set.

Three line formats (one per file, or mixed):
* ``{"prompt": str, "completion": str}`` — loss on the completion tokens only;
* ``{"messages": [{"role": str, "content": str}, ...]}`` — rendered with the tokenizer's chat template,
  loss on the assistant turns only;
* ``{"text": str}`` — loss on every token.

Parsing (``parse_jsonl``) needs no tokenizer, so the API process validates a dataset before queueing;
tokenization (``tokenize_records``) runs in the worker.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.errors import InvalidArgument
from loraflow.security.safe_files import read_regular_file

IGNORE_INDEX = -100  # label value cross-entropy skips
# Largest dataset a request may name; the API reads it whole to validate and copy it into the store.
MAX_DATASET_BYTES = 256 << 20
ROLES = ("system", "user", "assistant", "tool")

_FORMAT_KEYS = {
    "prompt_completion": {"prompt", "completion"},
    "messages": {"messages"},
    "text": {"text"},
}


@dataclass(frozen=True)
class Record:
    """One validated dataset line; ``line`` is 1-based, for error messages."""

    line: int
    kind: str  # "prompt_completion" | "messages" | "text"
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """A tokenized example: ``labels[i]`` is ``input_ids[i]`` where the loss applies, else IGNORE_INDEX."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def num_loss_tokens(self) -> int:
        # Position 0 is never a target: the loss predicts token i from the positions before it.
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


@dataclass(frozen=True)
class DatasetSplits:
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    dropped: int  # examples with no loss token left after truncation


def _bad_line(line: int, field: str, message: str) -> InvalidArgument:
    """An error about one line. It names the line, the field and what was wrong, and never quotes the
    file: a request may name any file, so its bytes must not travel back in an error."""
    return InvalidArgument(f"dataset line {line}: {message}", field=f"dataset line {line}: {field}",
                           value=f"line {line}", metadata={"line": str(line)})


def _check_string(line: int, field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _bad_line(line, field, f"{field!r} must be a string, got {type(value).__name__}")


def parse_line(line: int, text: str) -> Record:
    """Validate one JSONL line; raises InvalidArgument naming the line and the field."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad_line(line, "json", f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _bad_line(line, "json", f"expected a JSON object, got {type(obj).__name__}")
    keys = set(obj)
    kind = next((k for k, want in _FORMAT_KEYS.items() if keys == want), None)
    if kind is None:
        known = sorted(keys & {"prompt", "completion", "messages", "text"})
        raise _bad_line(line, "keys", f"expected keys {{prompt, completion}}, {{messages}} or {{text}}; the line "
                                      f"has {len(keys)} key(s), of which known: {known}")
    if kind == "prompt_completion":
        _check_string(line, "prompt", obj["prompt"])
        _check_string(line, "completion", obj["completion"])
        if not obj["completion"]:
            raise _bad_line(line, "completion", "'completion' must not be empty")
    elif kind == "text":
        _check_string(line, "text", obj["text"])
        if not obj["text"]:
            raise _bad_line(line, "text", "'text' must not be empty")
    else:
        _check_messages(line, obj["messages"])
    return Record(line=line, kind=kind, data=obj)


def _check_messages(line: int, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad_line(line, "messages", "'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad_line(line, field, f"{field} must be an object, got {type(msg).__name__}")
        if set(msg) - {"role", "content"} or "role" not in msg or "content" not in msg:
            raise _bad_line(line, field, f"{field} must have exactly the keys role and content (it has "
                                         f"{len(msg)} key(s))")
        if msg["role"] not in ROLES:
            raise _bad_line(line, f"{field}.role", f"{field}.role must be one of {list(ROLES)}")
        _check_string(line, f"{field}.content", msg["content"])
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad_line(line, "messages", "'messages' has no assistant turn to learn from")


def parse_jsonl(data: bytes | str, *, field: str = "dataset_uri") -> list[Record]:
    """Validate every line of a JSONL dataset up front; blank lines are skipped.

    Raises InvalidArgument for undecodable bytes, a bad line (naming its number and field) or no records.
    """
    if isinstance(data, bytes):
        if len(data) > MAX_DATASET_BYTES:
            raise InvalidArgument(f"dataset is {len(data)} bytes, more than the {MAX_DATASET_BYTES} limit",
                                  field=field, value=len(data))
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidArgument(f"dataset is not UTF-8 (byte {e.start})", field=field, value=e.start) from None
    records = [parse_line(n, text) for n, text in enumerate(data.splitlines(), start=1) if text.strip()]
    if not records:
        raise InvalidArgument("dataset is empty: no JSONL records", field=field, value=0)
    return records


def read_jsonl(path: str | Path, *, field: str = "dataset_uri") -> list[Record]:
    """Parse a local JSONL file (a regular file of at most MAX_DATASET_BYTES; see safe_files)."""
    return parse_jsonl(read_regular_file(path, field=field, limit=MAX_DATASET_BYTES), field=field)


# --- tokenization -------------------------------------------------------------------------------

def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _bos(tokenizer) -> list[int]:
    """The tokens the tokenizer itself puts before a text (e.g. Llama's <s>; none for SmolLM2), so
    training sees prompts exactly as the inference service encodes them (add_special_tokens=True)."""
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if getattr(tokenizer, "eos_token_id", None) is not None else []


def _render(tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_segments(tokenizer, record: Record) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trains) pieces: assistant replies train, the rest not.

    Renders growing prefixes of the conversation and takes the differences, so any chat template that
    renders a prefix as a prefix works; the assistant header (the generation prompt) does not train.
    """
    messages = record.data["messages"]
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            header = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
            if header.startswith(done) and i:
                pieces.append((header[len(done):], False))
                done = header
        full = _render(tokenizer, messages[: i + 1])
        if not full.startswith(done):
            raise InvalidArgument(f"dataset line {record.line}: the chat template does not render message {i} "
                                  "as an extension of the previous ones, so assistant turns cannot be masked",
                                  field=f"dataset line {record.line}: messages", value=i)
        pieces.append((full[len(done):], msg["role"] == "assistant"))
        done = full
    return pieces


def tokenize_record(tokenizer, record: Record, max_seq_len: int) -> Example:
    """Token ids and labels for one record, truncated to ``max_seq_len`` tokens."""
    if record.kind == "text":
        ids = _bos(tokenizer) + _encode(tokenizer, record.data["text"]) + _eos(tokenizer)
        labels = list(ids)
        if _bos(tokenizer):
            labels[0] = IGNORE_INDEX  # nothing predicts the first token
    elif record.kind == "prompt_completion":
        prompt = _bos(tokenizer) + _encode(tokenizer, record.data["prompt"])
        completion = _encode(tokenizer, record.data["completion"]) + _eos(tokenizer)
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidArgument(f"dataset line {record.line}: 'messages' needs a tokenizer with a chat template, "
                                  "and the base model's tokenizer has none",
                                  field=f"dataset line {record.line}: messages", value=None)
        ids, labels = [], []
        for text, trains in _chat_segments(tokenizer, record):
            piece = _encode(tokenizer, text)
            ids += piece
            labels += piece if trains else [IGNORE_INDEX] * len(piece)
    return Example(input_ids=tuple(ids[:max_seq_len]), labels=tuple(labels[:max_seq_len]))


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded shuffle, eval gets round(n * eval_fraction) (at least 1, at most n-1)."""
    if eval_fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def build_splits(tokenizer, records: list[Record], *, max_seq_len: int, eval_fraction: float,
                 seed: int) -> DatasetSplits:
    """Tokenize every record, drop those with no loss token left, split train/eval with the seed."""
    examples = [tokenize_record(tokenizer, r, max_seq_len) for r in records]
    kept = [e for e in examples if e.num_loss_tokens > 0]
    if not kept:
        raise InvalidArgument(f"no example has a token to learn from within max_seq_len={max_seq_len} "
                              "(completions/assistant turns were truncated away)",
                              field="training.max_seq_len", value=max_seq_len)
    train_idx, eval_idx = split_indices(len(kept), eval_fraction, seed)
    return DatasetSplits(train=tuple(kept[i] for i in train_idx), eval=tuple(kept[i] for i in eval_idx),
                         dropped=len(examples) - len(kept))
