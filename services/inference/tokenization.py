"""Tokenizer, chat template and EOS ids of a model directory, without torch or transformers.

Reads what ``save_pretrained`` writes: ``tokenizer.json`` (the ``tokenizers`` library runs it),
``tokenizer_config.json`` (special tokens, chat template), ``chat_template.jinja`` (transformers 5)
and ``generation_config.json`` / ``config.json`` (EOS ids). The chat template is rendered with the
same sandboxed Jinja settings as transformers' ``apply_chat_template``.

``encode`` and ``decode`` go through the ``tokenizers`` batch calls, which release the GIL while Rust
works (the single-text ones hold it: an 8 MiB prompt stalled every other thread of the server for
seconds). ``max_token_bytes`` bounds the text one token can stand for, so a caller can refuse a prompt
that cannot fit the context before tokenizing it (``max_prompt_bytes``).
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from pathlib import Path

from loraflow.errors import FailedPrecondition, InvalidArgument

# Below this many ids, decode in place (holding the GIL for microseconds); above, through decode_batch.
_DECODE_IN_PLACE = 64


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization, applied only when the tokenizer config asks for it.
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",")
            .replace(" ' ", "'").replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s")
            .replace(" 've", "'ve").replace(" 're", "'re"))


class TextTokenizer:
    """encode / decode / apply_chat_template / eos_ids for one model directory."""

    def __init__(self, model_dir: str | Path, *, chat_template: str | None = None,
                 eos_ids: tuple[int, ...] = ()):
        """``chat_template`` / ``eos_ids`` come from an artifact manifest when it records them; EOS ids
        given there win (as in ``generate``, which stops on the generation config's ids only)."""
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FailedPrecondition(f"{model_dir} has no tokenizer.json", field="artifact", value=str(model_dir))
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        self.chat_template = chat_template or self._find_chat_template(model_dir, config)
        self.eos_ids = frozenset(int(i) for i in eos_ids) or self._find_eos_ids(model_dir)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @staticmethod
    def _find_chat_template(model_dir: Path, config: dict) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    def _find_eos_ids(self, model_dir: Path) -> frozenset[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            value = _read_json(model_dir / name).get("eos_token_id")
            if value is not None:
                ids.update([value] if isinstance(value, int) else value)
                break
        if self.eos_token is not None:
            token_id = self._tok.token_to_id(self.eos_token)
            if token_id is not None:
                ids.add(token_id)
        return frozenset(ids)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL (encode does not): a long prompt costs its caller, not other threads.
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if len(ids) > _DECODE_IN_PLACE:  # a long decode runs without the GIL, like encode
            text = self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]
        else:  # the detokenizer's few-token windows: the batch call's overhead would dominate
            text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup else text

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """Most UTF-8 bytes of text one token can stand for. A vocabulary entry's spelling is never shorter than
        the text it stands for ("▁word", "<0xE2>", "##ing"); a byte-level vocabulary spells each byte as one
        character ("Ġword"), so there it is the length in characters. Added tokens match their content's bytes;
        a WordPiece model turns a whole word of up to max_input_chars_per_word characters into one unknown."""
        from tokenizers import decoders
        from tokenizers.models import WordPiece

        vocab = self._tok.get_vocab(with_added_tokens=False)
        if isinstance(self._tok.decoder, decoders.ByteLevel):
            longest = max((len(token) for token in vocab), default=1)
        else:
            longest = max((len(token.encode("utf-8", "surrogatepass")) for token in vocab), default=1)
        for added in self._tok.get_added_tokens_decoder().values():
            longest = max(longest, len(added.content.encode("utf-8", "surrogatepass")))
        if isinstance(self._tok.model, WordPiece):
            longest = max(longest, 4 * int(self._tok.model.max_input_chars_per_word))
        return max(1, longest)

    def max_prompt_bytes(self, max_tokens: int) -> int:
        """Text longer than this (UTF-8 bytes) always tokenizes to more than ``max_tokens`` tokens (unless the
        tokenizer's normalizer deletes characters, which such a prompt gains nothing from)."""
        return max_tokens * self.max_token_bytes

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise FailedPrecondition("this model's tokenizer has no chat template; send chat=false",
                                     field="chat", value=True)
        from jinja2 import TemplateError

        try:
            return self._compiled_chat_template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as err:
            raise FailedPrecondition(f"chat template failed to render: {err}", field="chat", value=True) from err

    @functools.cached_property
    def _compiled_chat_template(self):
        """The chat template compiled once (compiling it took milliseconds of every chat request's CPU)."""
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise InvalidArgument(f"chat template rejected the messages: {message}", field="prompt",
                                  value=message)

        def strftime_now(fmt):
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        try:
            return env.from_string(self.chat_template)
        except TemplateError as err:
            raise FailedPrecondition(f"chat template failed to render: {err}", field="chat", value=True) from err

    def encode_chat(self, user_message: str) -> list[int]:
        """Token ids of one user turn plus the assistant prompt (as apply_chat_template(tokenize=True))."""
        text = self.apply_chat_template([{"role": "user", "content": user_message}])
        return self.encode(text, add_special_tokens=False)
