"""QEfficient's names for loraflow's API: change `from QEfficient import ...` to this module's import.

    from loraflow.compat.qefficient import QEffAutoLoraModelForCausalLM
"""

from loraflow.api import AutoLoraModelForCausalLM, apply_peft, finetune, register_adapters

QEffAutoLoraModelForCausalLM = AutoLoraModelForCausalLM

__all__ = ["QEffAutoLoraModelForCausalLM", "apply_peft", "finetune", "register_adapters"]
