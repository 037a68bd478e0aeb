"""The sampling fields of a generation request, declared once: name, type, default, range check and help.

``SAMPLING_FIELDS`` is the one list; from it come ``SamplingParams`` (the frozen dataclass the engine
samples with, checked field by field on construction), the gRPC front door's reading of
``loraflow.v1.SamplingParams`` (``from_proto``: proto3 scalars cannot be unset, so 0 means the default),
the OpenAI front door's request fields (``http_name``, ``http_type``, ``http_default``; OpenAI's defaults
differ) and its error names, and the Python API's keyword list. Errors name ``sampling.<name>`` and
the value; each front door renames the field to what its caller sent.

Adding a sampling parameter: its field in ``protos/loraflow/v1/inference.proto`` (``make proto``), one
``SamplingField`` here, and what it does in ``services/inference/sampling.py`` (``Sampler``). No torch,
no service imports: the client, the CLI and the inference service all read this.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraflow.errors import InvalidArgument

DEFAULT_MAX_NEW_TOKENS = 64
# Bounds chosen so no accepted value can turn finite logits into inf/NaN probabilities:
# below TEMPERATURE_MIN, logits / T overflows float64 for any |logit| > ~1.8e306 * T (1e-320 is a
# subnormal: every logit becomes +-inf and the softmax is inf - inf = NaN); T = 0.01 already makes
# a 0.1 logit gap a 22000x probability ratio, so smaller values are greedy in all but name.
# Above TEMPERATURE_MAX the distribution is uniform in all but name.
TEMPERATURE_MIN = 1e-2
TEMPERATURE_MAX = 100.0
# The repetition penalty divides or multiplies logits by the penalty: the same overflow argument.
REPETITION_PENALTY_MIN = 1e-2
REPETITION_PENALTY_MAX = 100.0
# No vocabulary is near a million tokens; top_k above the vocabulary is simply "off".
MAX_TOP_K = 1 << 20
# The context bounds a request anyway; this keeps a single field from asking for absurd work.
MAX_NEW_TOKENS = 1 << 16
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63


@dataclass(frozen=True)
class Refusal:
    """Why a value is refused, and the value to report (an oversized one is summarised)."""

    why: str
    value: Any


Check = Callable[[Any], Refusal | None]


# numbers.Real / Integral take numpy's scalars too, without importing numpy here (the CLI reads this module).
def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _integer_in(low: int, high: int, why: str) -> Check:
    def check(value) -> Refusal | None:
        if not _is_integer(value):
            return Refusal("must be an integer", value)
        return None if low <= value <= high else Refusal(why, value)
    return check


def _off_or_in(low: float, high: float, why: str) -> Check:
    """A finite number that is 0 (off) or in [low, high]."""
    def check(value) -> Refusal | None:
        if not _is_number(value) or not math.isfinite(value):
            return Refusal("must be a finite number", value)
        return None if value == 0 or low <= value <= high else Refusal(why, value)
    return check


def _top_p(value) -> Refusal | None:
    if not _is_number(value) or not math.isfinite(value):
        return Refusal("must be a finite number", value)
    return None if 0 <= value <= 1 else Refusal("must be in (0, 1] (0 = off)", value)


def _seed(value) -> Refusal | None:
    if value is None or (isinstance(value, numbers.Integral) and 0 <= value < MAX_SEED):
        return None
    return Refusal("must be in [0, 2**63)", value)


def _stop(value) -> Refusal | None:
    if len(value) > MAX_STOP_STRINGS:
        return Refusal(f"may hold at most {MAX_STOP_STRINGS} strings", len(value))
    for i, s in enumerate(value):
        if not isinstance(s, str) or not s:
            return Refusal(f"must hold non-empty strings (stop[{i}] is empty)", list(value))
        if len(s) > MAX_STOP_STRING_CHARS:
            return Refusal(f"strings must be at most {MAX_STOP_STRING_CHARS} characters (stop[{i}] is longer)",
                           f"<{len(s)} chars>")
    return None


def _boolean(value) -> Refusal | None:
    return None if isinstance(value, bool) or value in (0, 1) else Refusal("must be true or false", value)


def _same(value):
    return value


def _stop_strings(value) -> tuple[str, ...]:
    """The OpenAI API's ``stop``: one string, a list of them, or none."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


_UNSET = object()


@dataclass(frozen=True)
class SamplingField:
    name: str  # SamplingParams.<name> and loraflow.v1.SamplingParams.<name>
    type: Any  # its Python type
    default: Any  # the value that leaves it off
    help: str
    check: Check
    from_proto: Callable[[Any], Any] = _same  # proto3 value -> ours (0 = unset where that differs)
    http_name: str = ""  # the OpenAI API's name for it ("" = name)
    http_type: Any = None  # its pydantic annotation there (None = type)
    http_default: Any = _UNSET  # OpenAI's default, where it differs from ours
    from_http: Callable[[Any], Any] = _same

    def __post_init__(self) -> None:
        object.__setattr__(self, "http_name", self.http_name or self.name)
        object.__setattr__(self, "http_type", self.http_type if self.http_type is not None else self.type)
        if self.http_default is _UNSET:
            object.__setattr__(self, "http_default", self.default)


# In loraflow.v1.SamplingParams's order.
SAMPLING_FIELDS: tuple[SamplingField, ...] = (
    SamplingField("max_new_tokens", int, DEFAULT_MAX_NEW_TOKENS,
                  f"Tokens to generate at most (1..{MAX_NEW_TOKENS}; 0 in a gRPC request = {DEFAULT_MAX_NEW_TOKENS}).",
                  _integer_in(1, MAX_NEW_TOKENS, f"must be in 1..{MAX_NEW_TOKENS}"),
                  from_proto=lambda v: v or DEFAULT_MAX_NEW_TOKENS, http_name="max_tokens", http_type=int | None,
                  http_default=None),
    SamplingField("temperature", float, 0.0,
                  f"Softmax temperature: 0 = greedy, else in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}].",
                  _off_or_in(TEMPERATURE_MIN, TEMPERATURE_MAX,
                             f"must be 0 (greedy) or in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX}]"),
                  http_default=1.0),  # OpenAI's default; send 0 for greedy decoding
    SamplingField("top_k", int, 0, f"Sample among the k most likely tokens (0 = off, at most {MAX_TOP_K}).",
                  _integer_in(0, MAX_TOP_K, f"must be in 0..{MAX_TOP_K} (0 = off)")),
    SamplingField("top_p", float, 0.0, "Nucleus sampling: the smallest set of tokens holding this much probability "
                  "(in (0, 1]; 0 = off, same as 1).", _top_p, http_default=1.0),
    SamplingField("seed", int | None, None, "Seed of the request's own generator (0..2**63-1; unset = random; 0 in "
                  "a gRPC request = unset).", _seed, from_proto=lambda v: v if v else None),
    SamplingField("stop", tuple[str, ...], (), f"Strings that end the completion (at most {MAX_STOP_STRINGS}, "
                  f"{MAX_STOP_STRING_CHARS} characters each).", _stop, from_proto=tuple,
                  http_type=str | list[str] | None, http_default=None, from_http=_stop_strings),
    SamplingField("repetition_penalty", float, 0.0, "Divide the logits of tokens already seen by this (0 = off, "
                  f"same as 1; else in [{REPETITION_PENALTY_MIN}, {REPETITION_PENALTY_MAX}]).",
                  _off_or_in(REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX,
                             f"must be 0 (off) or in [{REPETITION_PENALTY_MIN}, {REPETITION_PENALTY_MAX}]")),
    SamplingField("ignore_eos", bool, False, "Keep generating past the end-of-sequence token.", _boolean),
)
SAMPLING = {f.name: f for f in SAMPLING_FIELDS}


def _check_all(self) -> None:
    for f in SAMPLING_FIELDS:
        refusal = f.check(getattr(self, f.name))
        if refusal is not None:
            raise InvalidArgument(f"sampling.{f.name} {refusal.why}, got {refusal.value!r}",
                                  field=f"sampling.{f.name}", value=refusal.value)


SamplingParams = dataclasses.make_dataclass(
    "SamplingParams", [(f.name, f.type, dataclasses.field(default=f.default)) for f in SAMPLING_FIELDS],
    frozen=True,
    namespace={"__module__": __name__, "__doc__": "One request's sampling settings (SAMPLING_FIELDS), checked when built.",
               "__post_init__": _check_all, "greedy": property(lambda self: self.temperature == 0.0)})
