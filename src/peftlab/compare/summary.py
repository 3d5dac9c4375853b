"""The Markdown of a comparison: tables in the columns the reproduced projects used, the metric
definitions and evaluation settings exactly as run, and findings that state only what the numbers
show."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftlab.compare.plots import cell_label

if TYPE_CHECKING:
    from peftlab.compare.report import Quality, RunRecord

DEFINITIONS = """\
- Perplexity: exp of the token-weighted mean negative log-likelihood over every predicted token of
  the held-out text, sliding window L, stride S, each token scored once; padding never counts.
  Word perplexity and bits per byte follow lm-evaluation-harness (rolling log-likelihood per document).
- Label accuracy / macro-F1: the label with the highest log-likelihood given the prompt (or the
  argmax of a classification head).
- BLEU-4: sacrebleu corpus BLEU on detokenised text; ROUGE-L: rouge-score F-measure with stemming;
  greedy decoding, fixed max new tokens.
- Forgetting: per-token cross-entropy on a general held-out text after tuning minus before.
- Memory: peak CUDA memory allocated, or peak process RSS on the CPU. Time: wall time of training
  (evaluation excluded); tokens/s counts real (non-padding) tokens.
"""


def _f(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _pm(mean: Any, std: Any, spec: str = ".4g") -> str:
    return "-" if mean is None else f"{mean:{spec}} ± {_f(std, spec)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def settings_as_run(records: list[RunRecord]) -> str:
    c = records[0].config
    keys = [k for k in sorted(c) if k.startswith(("eval.", "data.")) and k not in ("eval.sample_prompts",)]
    return "\n".join(f"- `{k}`: {c[k]!r}" for k in keys)


def cell_table(summary: list[dict[str, Any]], quality: Quality) -> str:
    rows = [
        [
            cell_label(s),
            str(s["seeds"]),
            _f(s["base_quality"]),
            _pm(s["quality_mean"], s["quality_std"]),
            _f(s["change_vs_base"], "+.4g"),
            _pm(s["peak_memory_gib_mean"], s["peak_memory_gib_std"], ".3f"),
            _pm(s["seconds_per_epoch_mean"], s["seconds_per_epoch_std"], ".1f"),
            _pm(s["final_train_loss_mean"], s["final_train_loss_std"], ".4f"),
            ("memory " if s.get("pareto_peak") else "") + ("time" if s.get("pareto_train") else ""),
        ]
        for s in summary
    ]
    header = [
        "cell",
        "seeds",
        f"base {quality.label}",
        "tuned",
        "change",
        "peak memory GiB",
        "time / epoch s",
        "final train loss",
        "Pareto",
    ]
    return _table(header, rows)


def run_table(rows: list[dict[str, Any]]) -> str:
    header = [
        "run",
        "seed",
        "trainable params",
        "train tokens",
        "tokens/s",
        "peak GiB",
        "estimate GiB",
        "adapter MiB",
        "quality",
    ]
    body = [
        [
            r["run"],
            str(r["seed"]),
            _f(r["trainable_params"], ",d") if r["trainable_params"] is not None else "-",
            _f(r["train_tokens"], ",d") if r["train_tokens"] is not None else "-",
            _f(r["tokens_per_second"], ".1f"),
            _f(r["peak_memory_gib"], ".3f"),
            _f(r["estimated_peak_gib"], ".3f"),
            _f(r["adapter_mib"], ".2f"),
            _f(r["quality"]),
        ]
        for r in rows
    ]
    return _table(header, body)


def generation_table(rows: list[dict[str, Any]]) -> str | None:
    if not any(r.get("tuned_bleu4") is not None for r in rows):
        return None
    header = [
        "run",
        "BLEU-4 before",
        "BLEU-4 after",
        "ROUGE-L before",
        "ROUGE-L after",
        "peak GiB",
        "train s",
    ]
    body = [
        [
            r["run"],
            _f(r.get("base_bleu4"), ".2f"),
            _f(r.get("tuned_bleu4"), ".2f"),
            _f(r.get("base_rouge_l")),
            _f(r.get("tuned_rouge_l")),
            _f(r["peak_memory_gib"], ".3f"),
            _f(r["train_seconds"], ".1f"),
        ]
        for r in rows
    ]
    return _table(header, body)


def findings(summary: list[dict[str, Any]], quality: Quality) -> list[str]:
    """Short paragraphs that say only what the numbers show."""
    scored = [s for s in summary if s["quality_mean"] is not None]
    if not scored:
        return ["No run has a tuned quality score to compare."]
    best_first = sorted(scored, key=lambda s: s["quality_mean"], reverse=quality.higher_is_better)
    best = best_first[0]
    out = []
    if len(best_first) > 1:
        second = best_first[1]
        gap = abs(best["quality_mean"] - second["quality_mean"])
        spread = max(s["quality_std"] or 0 for s in (best, second))
        verdict = (
            "larger than the spread across seeds"
            if gap > spread and min(best["seeds"], second["seeds"]) > 1
            else "not larger than the spread across seeds"
            if min(best["seeds"], second["seeds"]) > 1
            else "with one seed per cell, so the spread across seeds is unknown"
        )
        out.append(
            f"**Best {quality.label}: {cell_label(best)}** ({best['quality_mean']:.4g}), ahead of "
            f"{cell_label(second)} ({second['quality_mean']:.4g}) by {gap:.4g}, {verdict} (largest std {spread:.3g})."
        )
    else:
        out.append(f"**{cell_label(best)}**: {quality.label} {best['quality_mean']:.4g}.")
    if best["change_vs_base"] is not None:
        out.append(
            f"Against the base model it moved {quality.label} by {best['change_vs_base']:+.4g} (base {best['base_quality']:.4g})."
        )
    for cost, unit, fmt in (
        ("peak_memory_gib", "peak memory", ".3f"),
        ("train_seconds", "training time", ".1f"),
    ):
        priced = [s for s in scored if s[f"{cost}_mean"] is not None]
        if priced and best[f"{cost}_mean"] is not None:
            cheapest = min(priced, key=lambda s: s[f"{cost}_mean"])
            out.append(
                f"Lowest {unit}: {cell_label(cheapest)} ({cheapest[f'{cost}_mean']:{fmt}}); the best-quality cell "
                f"costs {best[f'{cost}_mean']:{fmt}} ({best[f'{cost}_mean'] / cheapest[f'{cost}_mean']:.2f}x)."
            )
    front = [cell_label(s) for s in scored if s.get("pareto_peak")]
    if front:
        out.append(f"On the memory-quality Pareto front: {', '.join(front)}.")
    return out


def comparison_markdown(
    records: list[RunRecord],
    rows: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    quality: Quality,
    forced: list[str],
) -> str:
    parts = ["# Comparison", ""]
    if forced:
        parts += [
            f"**Forced:** these runs also differ in {', '.join(forced)}; the comparison is not like for like.",
            "",
        ]
    parts += ["## Cells (mean ± standard deviation over seeds)", "", cell_table(summary, quality), ""]
    parts += ["## Runs", "", run_table(rows), ""]
    generation = generation_table(rows)
    if generation:
        parts += ["## BLEU-4 and ROUGE-L before and after", "", generation, ""]
    parts += [
        "## Metric definitions",
        "",
        DEFINITIONS,
        "## Evaluation and data settings, as run",
        "",
        settings_as_run(records),
        "",
    ]
    return "\n".join(parts)


def summary_markdown(
    records: list[RunRecord],
    summary: list[dict[str, Any]],
    quality: Quality,
    plots: list[Path],
    forced: list[str],
    out: Path,
) -> str:
    parts = ["# Summary", ""]
    if forced:
        parts += [f"**Forced comparison:** the runs also differ in {', '.join(forced)}.", ""]
    parts += ["## Findings", "", *[f"- {line}" for line in findings(summary, quality)], ""]
    parts += ["## Cells", "", cell_table(summary, quality), ""]
    parts += ["## Plots", "", *[f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots], ""]
    parts += [f"{len(records)} runs; tables in comparison.md, numbers in comparison.csv and summary.csv.", ""]
    return "\n".join(parts)
