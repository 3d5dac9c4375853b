"""Plots (matplotlib, headless): a person would rather look at a loss curve than read one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt


def plot_loss(log: list[dict[str, Any]], path: Path, title: str) -> Path:
    steps = [r["step"] for r in log if "loss" in r]
    losses = [r["loss"] for r in log if "loss" in r]
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, marker="o" if len(steps) < 40 else None, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token cross-entropy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
