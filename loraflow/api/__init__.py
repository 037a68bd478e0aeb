"""The Python front door: QEfficient-style model, compile, generate and fine-tune calls (issue 10).

`import loraflow` stays light and exposes these names lazily; torch and ONNX Runtime are imported
only when a model is compiled or trained.
"""

from loraflow.api.adapter_set import UnknownAdapterError
from loraflow.api.auto_model import AutoLoraModelForCausalLM
from loraflow.api.finetune import FinetuneResult, apply_peft, finetune
from loraflow.api.generation import GenerationResult, PerfMetrics
from loraflow.api.registered import register_adapters

__all__ = ["AutoLoraModelForCausalLM", "FinetuneResult", "GenerationResult", "PerfMetrics", "UnknownAdapterError",
           "apply_peft", "finetune", "register_adapters"]
