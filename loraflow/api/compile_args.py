"""QEfficient's `compile(...)` keywords → loraflow CompileOptions, and what each target ignores.

num_cores and mxfp6_matmul only mean something to qaic-exec (target "ai100"): for "onnxruntime"
they are recorded on the model and left out of the options (so they do not change the artifact id),
with a logged note. QEfficient's other qaic-exec switches are recorded and noted the same way on
both targets, because loraflow's AI 100 compile fixes its own flags. Anything else is a TypeError,
as an unexpected keyword argument is in Python.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from services.compiler.options import CompileOptions

log = logging.getLogger("loraflow.api")

# QEfficient / qaic-exec compile switches loraflow's AI 100 path does not take.
QAIC_ONLY_OPTIONS = frozenset({
    "mos", "aic_enable_depth_first", "num_devices", "device_group", "mdp_ts_num_devices", "allow_mxint8_mdp_io",
    "mxint8_kv_cache", "num_speculative_tokens", "enable_qnn", "qnn_config", "compile_dir", "onnx_path",
    "aic_hw_version", "mdts_mxfp6_matmul", "aic_num_cores",
})
# CompileOptions fields a caller may set beyond QEfficient's named arguments.
OWN_OPTIONS = ("max_rank", "adapter_slots", "target_modules")
DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "int8": "int8", "int4": "int4"}


@dataclass(frozen=True)
class CompileRequest:
    options: CompileOptions
    ignored: dict[str, Any] = field(default_factory=dict)  # recorded, not passed to the compiler


def build_compile_request(*, prefill_seq_len: int, ctx_len: int, full_batch_size: int | None, batch_size: int,
                          num_cores: int, mxfp6_matmul: bool, dtype: Any, target: str,
                          continuous_batching: bool, compiler_options: dict[str, Any]) -> CompileRequest:
    if continuous_batching and full_batch_size is None:
        # QEfficient: a continuous-batching model needs the number of KV-cache slots.
        raise TypeError("compile() missing required argument 'full_batch_size' (the model was loaded with "
                        "continuous_batching=True)")
    unknown = sorted(k for k in compiler_options if k not in QAIC_ONLY_OPTIONS and k not in OWN_OPTIONS)
    if unknown:
        raise TypeError(f"compile() got unexpected keyword argument(s) {unknown}; loraflow also takes "
                        f"{list(OWN_OPTIONS)}, and records {sorted(QAIC_ONLY_OPTIONS)} without using them")
    ignored = {k: v for k, v in compiler_options.items() if k in QAIC_ONLY_OPTIONS}
    extra = {k: v for k, v in compiler_options.items() if k in OWN_OPTIONS}
    if "target_modules" in extra:
        extra["target_modules"] = tuple(extra["target_modules"])
    dtype_name = _dtype_name(dtype)
    ai100 = target == "ai100"
    if not ai100:
        ignored["num_cores"] = num_cores
        ignored["mxfp6_matmul"] = mxfp6_matmul
    options = CompileOptions(
        target=target, batch_size=batch_size, full_batch_size=full_batch_size, prefill_seq_len=prefill_seq_len,
        ctx_len=ctx_len, dtype=dtype_name, num_cores=num_cores if ai100 else None,
        mxfp6_matmul=bool(mxfp6_matmul) if ai100 else False, **extra)
    options.validate()
    notable = {k: v for k, v in ignored.items() if not (k == "mxfp6_matmul" and not v)}
    if notable:
        log.info("compile(target=%r): %s recorded but not used (%s)", target, sorted(notable),
                 "AI 100 options; ONNX Runtime ignores them" if not ai100 else "loraflow's qaic-exec call sets its "
                 "own flags")
    return CompileRequest(options=options, ignored=ignored)


def _dtype_name(dtype: Any) -> str:
    """'fp32' / 'fp16' / 'int8' / 'int4', also from torch or numpy dtypes and their names."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in DTYPE_ALIASES:
        return str(dtype)  # CompileOptions.validate names it with the allowed values
    return DTYPE_ALIASES[name]
