"""The memory a training job will take on a worker, from its (strictly read) config.json and settings.

Shared by the API (refuse before queueing) and the worker (refuse before loading weights): both compare it
with loraflow.options.budget's ResourceBudget.
"""

from __future__ import annotations

from loraflow.artifact.graph_contract import LORA_TARGET_MODULES
from loraflow.options.budget import MemoryEstimate, training_estimate
from loraflow.options.hf_config import HfModelConfig
from services.trainer.training import ALL_LINEAR, LoraSettings, TrainingSettings


def estimate_training(model: HfModelConfig, lora: LoraSettings, training: TrainingSettings) -> MemoryEstimate:
    """The memory one worker needs for this job (each rank on one machine loads its own copy)."""
    targets = LORA_TARGET_MODULES if lora.target_modules == (ALL_LINEAR,) else lora.target_modules
    return training_estimate(model, rank=lora.r, target_modules=targets, batch_size=training.batch_size,
                             max_seq_len=training.max_seq_len,
                             gradient_checkpointing=training.gradient_checkpointing,
                             local_ranks=training.world_size // training.nodes, device=training.device)
