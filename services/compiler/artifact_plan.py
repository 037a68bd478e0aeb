"""ArtifactPlan: what ``plan_artifact`` decides before any heavy work, in a module of its own so the compile
backends can take it without importing ``services.compiler.artifact`` (which imports them)."""

from __future__ import annotations

from dataclasses import dataclass

from loraflow.artifact import lora_bank
from services.compiler.modeling.config import DecoderConfig
from services.compiler.options import CompileOptions


@dataclass(frozen=True)
class ArtifactPlan:
    """Everything decided before any heavy work: resolved options, adapters, id."""

    artifact_id: str
    options: CompileOptions  # resolved
    config: DecoderConfig
    base_fingerprint: str
    adapters: tuple[lora_bank.Adapter, ...]
    bank_spec: lora_bank.BankSpec
