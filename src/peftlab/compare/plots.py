"""The comparison's plots (PNG, matplotlib, headless): loss curves overlaid, quality before and
after per cell, memory and time against quality with the Pareto front and seed error bars, and
BLEU-4 / ROUGE-L before and after for chat runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt

if TYPE_CHECKING:
    from peftlab.compare.report import Quality, RunRecord


def cell_label(summary: dict[str, Any]) -> str:
    keys = [
        k
        for k in summary
        if k not in ("seeds",)
        and not k.endswith(("_mean", "_std"))
        and not k.startswith(("pareto_", "base_", "change_"))
    ]
    parts = [str(summary["method"])] + [f"{k.rsplit('.', 1)[-1]}={summary[k]}" for k in keys if k != "method"]
    return " ".join(parts)


def plot_report(
    records: list[RunRecord],
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    quality: Quality,
    folder: Path,
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = [
        _loss_curves(records, folder / "loss_curves.png"),
        _before_after(summary, quality, folder / "quality_before_after.png"),
    ]
    for cost, unit in (("peak_memory_gib", "peak memory (GiB)"), ("train_seconds", "training time (s)")):
        written.append(
            _cost_against_quality(
                summary, quality, cost, unit, folder / f"{cost.split('_')[0]}_vs_quality.png"
            )
        )
    if any(r.get("tuned_bleu4") is not None for r in rows):
        written.append(_bleu_rouge(rows, folder / "bleu_rouge.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _loss_curves(records: list[RunRecord], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for record in records:
        steps = [r["step"] for r in record.log if "loss" in r]
        ax.plot(steps, [r["loss"] for r in record.log if "loss" in r], linewidth=1.2, label=record.name[:40])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (mean token cross-entropy)")
    ax.set_title("training loss, every run")
    ax.grid(alpha=0.3)
    if len(records) <= 12:
        ax.legend(fontsize=6)
    return _save(fig, path)


def _before_after(summary: list[dict[str, Any]], quality: Quality, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(summary) + 2), 4), dpi=120)
    labels = [cell_label(s) for s in summary]
    xs = range(len(summary))
    ax.bar([x - 0.2 for x in xs], [s["base_quality"] or 0 for s in summary], width=0.4, label="base")
    ax.bar(
        [x + 0.2 for x in xs],
        [s["quality_mean"] or 0 for s in summary],
        width=0.4,
        yerr=[s["quality_std"] or 0 for s in summary],
        capsize=3,
        label="tuned (mean over seeds)",
    )
    ax.set_xticks(list(xs), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(quality.label)
    ax.set_title(
        f"{quality.label} before and after ({'higher' if quality.higher_is_better else 'lower'} is better)"
    )
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _cost_against_quality(
    summary: list[dict[str, Any]], quality: Quality, cost: str, unit: str, path: Path
) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    mark = f"pareto_{cost.split('_')[0]}"
    shown = [s for s in summary if s["quality_mean"] is not None and s[f"{cost}_mean"] is not None]
    for s in shown:
        ax.errorbar(
            s[f"{cost}_mean"],
            s["quality_mean"],
            xerr=s[f"{cost}_std"] or 0,
            yerr=s["quality_std"] or 0,
            fmt="o",
            color="tab:red" if s.get(mark) else "tab:blue",
            capsize=3,
        )
        ax.annotate(
            cell_label(s),
            (s[f"{cost}_mean"], s["quality_mean"]),
            fontsize=6,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = sorted((s for s in shown if s.get(mark)), key=lambda s: s[f"{cost}_mean"])
    if len(front) > 1:
        ax.plot(
            [s[f"{cost}_mean"] for s in front],
            [s["quality_mean"] for s in front],
            "--",
            color="tab:red",
            linewidth=1,
            label="Pareto front",
        )
        ax.legend(fontsize=7)
    ax.set_xlabel(unit)
    ax.set_ylabel(f"{quality.label} ({'higher' if quality.higher_is_better else 'lower'} is better)")
    ax.set_title(f"{unit.split(' (')[0]} against quality (error bars: std over seeds)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _bleu_rouge(rows: list[dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=120)
    names = [r["run"][:28] for r in rows]
    for ax, metric, label in ((axes[0], "bleu4", "BLEU-4"), (axes[1], "rouge_l", "ROUGE-L F")):
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r.get(f"base_{metric}") or 0 for r in rows], width=0.4, label="base")
        ax.bar([x + 0.2 for x in xs], [r.get(f"tuned_{metric}") or 0 for r in rows], width=0.4, label="tuned")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=6)
        ax.set_ylabel(label)
        ax.set_title(f"{label} before and after (greedy)")
        ax.legend(fontsize=7)
    return _save(fig, path)
