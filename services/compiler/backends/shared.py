"""What every compile backend shares: the job it builds from, what its export returns, the stage clock, and
the pieces each target used alike (bank feeds, verification banks, the verify-report dict, tokenizer copy)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loraflow.artifact import graph_contract as gc
from loraflow.artifact import lora_bank
from loraflow.artifact.manifest import GraphSpec
from loraflow.errors import InvalidArgument
from loraflow.security.safe_files import confined_file
from services.compiler.artifact_plan import ArtifactPlan
from services.compiler.modeling.weights import CheckpointWeights
from services.compiler.options import CompileOptions

if TYPE_CHECKING:
    from services.compiler.export import BankShape  # imports torch: only for the annotation

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")

Progress = Callable[[str, float, str], None]


@dataclass(frozen=True)
class BuildJob:
    """One artifact build as a backend sees it: the plan, the streamed checkpoint, the banks."""

    plan: ArtifactPlan
    base_model_dir: Path
    out_dir: Path
    weights: CheckpointWeights
    banks: BankShape
    banks_a: dict[str, np.ndarray]
    banks_b: dict[str, np.ndarray]
    feeds: dict[str, np.ndarray]  # the verification banks (graph input name -> bank)
    occupied: int  # slots the verification drives
    lora_modules: tuple[str, ...]

    @property
    def options(self) -> CompileOptions:
        return self.plan.options


@dataclass(frozen=True)
class Exported:
    """A backend's exported graph: its spec, the files hashed while written, and what the manifest adds."""

    graph: GraphSpec
    digests: Mapping[str, str] = field(default_factory=dict)  # artifact-relative path -> sha256
    specializations: tuple[Mapping[str, Any], ...] | None = None  # ai100 only
    extra: Mapping[str, Any] = field(default_factory=dict)  # manifest extras, after "verify"
    written: Any = None  # the backend's own export result, for its verify / finish


@dataclass
class Stages:
    """Reports each stage with its duration and calls ``stop()`` after it (a cancelled job stops there)."""

    report: Progress
    stop: Callable[[], None]
    timings: dict[str, float] = field(default_factory=dict)

    def done(self, name: str, fraction: float, message: str, started: float) -> None:
        self.took(name, fraction, message, time.perf_counter() - started)

    def took(self, name: str, fraction: float, message: str, seconds: float) -> None:
        self.timings[name] = seconds
        self.report(name, fraction, f"{message} ({seconds:.1f}s)")
        self.stop()


@dataclass(frozen=True)
class Backend:
    """One compile target: which plans it takes, how it exports, how it proves the export right.

    ``export`` reports the export (and optimize) stages and returns the graph; ``verify`` reports the verify
    stage and returns the manifest's ``verify`` report; ``finish`` runs after verification (the AI 100 QPC
    compile) and returns more manifest extras."""

    name: str
    accepts: Callable[[ArtifactPlan], bool]
    export: Callable[[BuildJob, Stages], Exported]
    verify: Callable[[BuildJob, Exported, Stages], dict[str, Any]]
    finish: Callable[[BuildJob, Exported, Stages], dict[str, Any]] = lambda job, exported, stages: {}


def build_banks(plan: ArtifactPlan) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    banks_a, banks_b = lora_bank.empty_banks(plan.bank_spec)
    for slot, adapter in enumerate(plan.adapters, start=1):
        lora_bank.write_slot(banks_a, banks_b, slot, adapter, plan.bank_spec)
    return banks_a, banks_b


def bank_feeds(banks_a: dict[str, np.ndarray], banks_b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feeds = {}
    for m in banks_a:
        feeds[gc.lora_a(m)] = banks_a[m]
        feeds[gc.lora_b(m)] = banks_b[m]
    return feeds


def verification_banks(bank_feeds: dict[str, np.ndarray], num_adapters: int) -> tuple[dict[str, np.ndarray], int]:
    """(banks, occupied slots): with no adapter yet, a random slot 1 exercises the LoRA path anyway."""
    feeds = dict(bank_feeds)
    if num_adapters:
        return feeds, num_adapters
    rng = np.random.default_rng(0)
    for name, bank in feeds.items():
        bank = bank.copy()
        bank[:, 1] = rng.normal(0, 0.05, bank[:, 1].shape)
        feeds[name] = bank
    return feeds, 1


def verify_dict(report) -> dict[str, Any]:
    return {"max_abs_diff": report.max_abs_diff, "relative_diff": report.relative_diff,
            "tolerance": report.tolerance, "tokens_match": report.tokens_match, "calls": report.calls,
            "reference_fp32_error": report.reference_error, "reference_max_activation": report.max_activation,
            "reference_rounding_sensitivity": report.rounding_error}


def copy_tokenizer(base_model_dir: Path, dst: Path) -> str | None:
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        src = base_model_dir / name
        if src.is_file() or src.is_symlink():
            # A tokenizer file linked to outside the model directory (chat_template.jinja -> a secret) is refused.
            shutil.copyfile(confined_file(base_model_dir, name, field="base_model"), dst / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied and "vocab.json" not in copied:
        raise InvalidArgument(f"{base_model_dir} has no tokenizer files", field="base_model",
                              value=str(base_model_dir))
    if (dst / "chat_template.jinja").is_file():
        return (dst / "chat_template.jinja").read_text()
    if (dst / "chat_template.json").is_file():
        return json.loads((dst / "chat_template.json").read_text()).get("chat_template")
    if (dst / "tokenizer_config.json").is_file():
        return json.loads((dst / "tokenizer_config.json").read_text()).get("chat_template")
    return None
