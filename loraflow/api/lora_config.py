"""PEFT's own `LoraConfig` → the trainer's `LoraSettings`, refusing what the compiler cannot serve.

The fields the banks can hold are translated; LoraSettings' own validation then refuses lm_head or
embedding targets and trained biases. PEFT features that change the layout (DoRA, modules_to_save,
rank/alpha patterns, layer selection, ...) are refused here, naming the field and the value.
"""

from __future__ import annotations

from typing import Any

from loraflow.errors import InvalidArgument

# LoraConfig fields that, when set, describe an adapter the trainer does not produce or the banks cannot hold.
REFUSED_FIELDS = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "layers_pattern", "layer_replication", "fan_in_fan_out", "lora_bias", "target_parameters",
                  "trainable_token_indices", "exclude_modules", "use_qalora", "megatron_config")


def lora_settings(lora_config: Any):
    from peft import LoraConfig

    from services.trainer.training import LoraSettings

    if lora_config is None:
        return LoraSettings()
    if not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    for name in REFUSED_FIELDS:
        value = getattr(lora_config, name, None)
        if value:
            raise InvalidArgument(f"lora_config.{name}={value!r} cannot be trained and served by loraflow "
                                  "(leave it unset)", field=f"lora_config.{name}", value=str(value))
    targets = lora_config.target_modules
    if targets is None:
        targets = ()
    elif isinstance(targets, str):
        targets = (targets,)  # "all-linear", or a PEFT regex that LoraSettings refuses unless it is a module name
    else:
        targets = tuple(sorted(targets))
    kwargs: dict[str, Any] = dict(r=lora_config.r, lora_alpha=float(lora_config.lora_alpha),
                                  lora_dropout=float(lora_config.lora_dropout), bias=lora_config.bias,
                                  use_rslora=bool(lora_config.use_rslora))
    if targets:
        kwargs["target_modules"] = targets
    return LoraSettings(**kwargs)
