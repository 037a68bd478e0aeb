"""Incremental detokenization with stop strings, correct across multi-byte characters and word-start spaces.

Text is produced as the difference between decode(context + new tokens) and decode(context), where
the context is a few tokens before the new ones (the approach of TGI and vLLM): tokenizers that put
spaces on word starts (SentencePiece "▁", byte-level "Ġ") then render them correctly, and a token
that ends inside a multi-byte UTF-8 character (decoded as U+FFFD) is held back until the character
completes. Stop strings are matched on the whole output text; the last ``len(longest stop) - 1``
characters are held back so a stop string split over chunks is never emitted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Prompt tokens kept as decoding context (enough to fix spaces and partial characters).
_CONTEXT_TOKENS = 6
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed sampled token ids with add(); get text deltas. finish() flushes what was held back."""

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int],
                 stop: Sequence[str] = ()):
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all decoded output text (may run ahead of what was emitted)
        self._emitted = 0
        self.stopped = False  # a stop string matched; text is cut before it

    def add(self, token_id: int) -> str:
        """Append one token; return the text that may be shown now ("" while held back)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self.text += new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text once generation ended (incomplete characters included as decoded)."""
        if not self.stopped:
            prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
            new_text = self._decode(self._ids[self._prefix_offset:])
            if len(new_text) > len(prefix_text):
                self.text += new_text[len(prefix_text):]
                self._prefix_offset = self._read_offset = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop and not self.stopped:
            # A match can only start in the part not yet emitted (see module doc).
            start = max(0, self._emitted)
            cut = -1
            for s in self._stop:
                idx = self.text.find(s, start)
                if idx != -1 and (cut == -1 or idx < cut):
                    cut = idx
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
                final = True
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
