"""The loss-curve PNG written next to every adapter: train loss and eval loss against the optimiser step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display in services and CI

import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(train: Sequence[tuple[int, float]], eval_: Sequence[tuple[int, float]], path: str | Path,
                    *, title: str = "LoRA fine-tuning") -> Path:
    """Write a PNG of (step, loss) points; returns the path. Either series may be empty."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    try:
        if train:
            steps, losses = zip(*train, strict=True)
            ax.plot(steps, losses, label="train loss", color="tab:blue", linewidth=1.6)
        if eval_:
            steps, losses = zip(*eval_, strict=True)
            ax.plot(steps, losses, label="eval loss", color="tab:orange", linewidth=1.6, marker="o", markersize=4)
        ax.set_xlabel("optimiser step", fontsize=11)
        ax.set_ylabel("cross-entropy loss (nats/token)", fontsize=11)
        ax.set_title(title, fontsize=12)
        ax.grid(True, alpha=0.3)
        if train or eval_:
            ax.legend(fontsize=10)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
