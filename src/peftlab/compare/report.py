"""A comparison report built only from run folders: nothing is trained or evaluated again, and the
same folders always give the same files.

comparison.csv  one row per run: settings, seed, parameters, tokens, time, memory, every metric
summary.csv     one row per cell (runs that differ only by seed): mean and standard deviation over
                seeds, the change against the base model, Pareto-front marks
comparison.md   the tables, the metric definitions and evaluation settings as run
summary.md      the tables, the plots and one short paragraph per finding
plots/          loss curves, quality before/after, memory and time against quality (Pareto front)

Runs that differ in anything but the sweep's axes and the seed (evaluation settings, data, model,
token budget) are refused, with the keys named, unless forced; a forced report says so.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError
from peftlab.runs import atomic_write_text, load_run
from peftlab.train.callbacks import read_log

SEED_KEY = "train.seed"
# Settings that may differ between compared runs without making them incomparable: what the sweep
# derives per run (steps from the equal token budget), where the run lives and what it reports to.
DERIVED = ("train.max_steps", "output.dir", "output.name", "train.report_to", "train.tracker_group")


@dataclass
class RunRecord:
    folder: Path
    config: dict[str, Any]  # flattened dotted keys of config.yaml
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    log: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass(frozen=True)
class Quality:
    """The headline metric of a data kind: which key, its label, and which direction is better."""

    label: str
    path: tuple[str, ...]
    higher_is_better: bool

    def of(self, side: dict[str, Any]) -> float | None:
        value: Any = side
        for part in self.path:
            value = value.get(part) if isinstance(value, dict) else None
        return float(value) if isinstance(value, int | float) else None


QUALITY = {
    "text": Quality("held-out perplexity (token-level)", ("perplexity",), higher_is_better=False),
    "classification": Quality("label accuracy", ("classification", "accuracy"), higher_is_better=True),
    "chat": Quality("ROUGE-L F", ("generation", "rouge_l"), higher_is_better=True),
}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def collect(paths: list[Path]) -> list[RunRecord]:
    """Completed runs from run folders, or from a sweep folder's runs/; sorted by name."""
    import yaml

    folders: list[Path] = []
    for path in paths:
        if (path / "manifest.json").is_file():
            folders.append(path)
        elif (path / "runs").is_dir():
            folders += sorted(d for d in (path / "runs").iterdir() if (d / "manifest.json").is_file())
        else:
            raise PeftlabError(
                f"{path} is neither a run folder nor a sweep folder (no manifest.json, no runs/)"
            )
    records = []
    for folder in folders:
        loaded = load_run(folder, allow_unfinished=True)
        if loaded["manifest"].get("status") != "completed" or loaded["metrics"] is None:
            continue
        config = flatten(yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")))
        records.append(
            RunRecord(folder, config, loaded["manifest"], loaded["metrics"], read_log(folder / "log.jsonl"))
        )
    if not records:
        raise PeftlabError(f"no finished run in {', '.join(str(p) for p in paths)}: nothing to report")
    return sorted(records, key=lambda r: r.name)


def varying_keys(records: list[RunRecord]) -> list[str]:
    keys = sorted({k for r in records for k in r.config})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in records}) > 1]


def on_axis(key: str, axes: list[str]) -> bool:
    """Is `key` set by an axis (itself, or inside a whole section an axis sets, e.g. method.r under method)?"""
    return any(key == axis or key.startswith(axis + ".") for axis in axes)


def axis_value(record: RunRecord, axis: str) -> Any:
    """The run's value on an axis; for a whole-section axis, its name and short settings."""
    if axis in record.config:
        return record.config[axis]
    inside = {k[len(axis) + 1 :]: v for k, v in record.config.items() if k.startswith(axis + ".")}
    name = inside.pop("name", "")
    return " ".join(
        [str(name), *(f"{k}={v}" for k, v in inside.items() if not isinstance(v, list | dict))]
    ).strip()


def incomparable_keys(records: list[RunRecord], axes: list[str]) -> list[str]:
    """Config keys (and model identities) that differ between runs but are no axis, seed or derived key."""
    differ = [k for k in varying_keys(records) if not on_axis(k, [*axes, SEED_KEY, *DERIVED])]
    fingerprints = {json.dumps(r.manifest.get("model", {}).get("fingerprint")) for r in records}
    if len(fingerprints) > 1:
        differ.append("model weights (manifest model.fingerprint)")
    if len({r.metrics.get("real_tokens_trained") for r in records}) > 1:
        differ.append("training tokens (metrics real_tokens_trained)")
    return differ


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> set[int]:
    """Indices of the (cost, quality) points no other point beats: no cost that is lower-or-equal
    with a quality that is better-or-equal, one of them strictly."""
    front = set()
    for i, (cost, quality) in enumerate(points):
        dominated = False
        for j, (other_cost, other_quality) in enumerate(points):
            if i == j:
                continue
            as_good = other_quality >= quality if higher_is_better else other_quality <= quality
            better = other_quality > quality if higher_is_better else other_quality < quality
            if other_cost <= cost and as_good and (other_cost < cost or better):
                dominated = True
                break
        if not dominated:
            front.add(i)
    return front


def run_row(record: RunRecord, axes: list[str]) -> dict[str, Any]:
    m, kind = record.metrics, record.config.get("data.kind", "text")
    base, tuned = m.get("base") or {}, m.get("tuned") or {}
    memory = m.get("memory") or {}
    peak = memory.get("cuda_peak_allocated_bytes") or memory.get("peak_rss_bytes")
    estimate = (m.get("estimate") or {}).get("total")
    artefact = record.folder / str(m.get("artefact", "adapter"))
    row: dict[str, Any] = {"run": record.name, "model": record.config.get("model.name")}
    row["data"] = record.config.get("data.train_path")
    row["method"] = record.config.get("method.name")
    row.update({key: axis_value(record, key) for key in axes if key != "method.name"})
    row["seed"] = record.config.get(SEED_KEY)
    row.update(
        trainable_params=m.get("trainable_params"),
        train_tokens=m.get("real_tokens_trained"),
        train_seconds=m.get("train_seconds"),
        seconds_per_epoch=m.get("seconds_per_epoch"),
        tokens_per_second=m.get("tokens_per_second"),
        peak_memory_gib=peak / 2**30 if peak else None,
        estimated_peak_gib=estimate / 2**30 if estimate else None,
        adapter_mib=sum(f.stat().st_size for f in artefact.rglob("*") if f.is_file()) / 2**20
        if artefact.is_dir()
        else None,
        final_train_loss=m.get("final_logged_loss"),
        final_eval_loss=m.get("final_eval_loss"),
        best_eval_loss=m.get("best_eval_loss"),
    )
    metrics = {
        "perplexity": ("perplexity",),
        "token_accuracy": ("token_accuracy",),
        "word_perplexity": ("units", "word_perplexity"),
        "bits_per_byte": ("units", "bits_per_byte"),
        "accuracy": ("classification", "accuracy"),
        "macro_f1": ("classification", "macro_f1"),
        "bleu4": ("generation", "bleu4"),
        "rouge_l": ("generation", "rouge_l"),
    }
    for name, path in metrics.items():
        for side, values in (("base", base), ("tuned", tuned)):
            value = Quality(name, path, True).of(values)
            if value is not None:
                row[f"{side}_{name}"] = value
    forgetting = m.get("forgetting") or {}
    row["forgetting_ce"] = forgetting.get("forgetting")  # tuned minus base cross-entropy, general text
    row["quality"] = QUALITY[kind].of(tuned)
    return row


def to_csv(rows: list[dict[str, Any]]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _plain(row.get(k)) for k in columns})
    return out.getvalue()


def _plain(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


SUMMARISED = (
    "quality",
    "train_seconds",
    "seconds_per_epoch",
    "tokens_per_second",
    "peak_memory_gib",
    "final_train_loss",
)


def summary_rows(rows: list[dict[str, Any]], axes: list[str], quality: Quality) -> list[dict[str, Any]]:
    """One row per cell: mean and standard deviation over seeds, change against the base, Pareto marks."""
    cell_keys = list(dict.fromkeys(["method", *[k for k in axes if k != "method.name"]]))
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(tuple(json.dumps(row.get(k)) for k in cell_keys), []).append(row)
    out = []
    for members in cells.values():
        summary: dict[str, Any] = {k: members[0].get(k) for k in cell_keys}
        summary["seeds"] = len(members)
        for name in SUMMARISED:
            mean, std = _mean_std([r[name] for r in members if r.get(name) is not None])
            summary[f"{name}_mean"], summary[f"{name}_std"] = mean, std
        base_key = "base_" + quality.path[-1]
        base = _mean_std([r[base_key] for r in members if r.get(base_key) is not None])[0]
        summary["base_quality"] = base
        summary["change_vs_base"] = (
            summary["quality_mean"] - base
            if base is not None and summary["quality_mean"] is not None
            else None
        )
        out.append(summary)
    for cost in ("peak_memory_gib", "train_seconds"):
        usable = [
            i for i, s in enumerate(out) if s["quality_mean"] is not None and s[f"{cost}_mean"] is not None
        ]
        front = pareto_front(
            [(out[i][f"{cost}_mean"], out[i]["quality_mean"]) for i in usable], quality.higher_is_better
        )
        for position, i in enumerate(usable):
            out[i][f"pareto_{cost.split('_')[0]}"] = position in front
    return out


def load_records_for_report(paths: list[Path], force: bool) -> tuple[list[RunRecord], list[str], list[str]]:
    """(records, axis keys, incomparable keys) for `peftlab report`; refuses mismatched runs unless forced."""
    records = collect(paths)
    # Without a sweep's own axes, what may differ is the method and its training settings; data,
    # model and evaluation settings may not.
    axes = _sweep_axes(paths) or [
        k
        for k in varying_keys(records)
        if k.startswith(("method.", "train.")) and k not in (SEED_KEY, *DERIVED)
    ]
    bad = incomparable_keys(records, axes)
    if bad and not force:
        raise PeftlabError(
            f"these runs differ in more than the sweep's axes and the seed: {', '.join(bad)}; "
            "compare runs that share everything else, or pass --force (the report then says so)"
        )
    return records, axes, bad


def _sweep_axes(paths: list[Path]) -> list[str]:
    keys: list[str] = []
    for path in paths:
        state = path / "sweep.json"
        if state.is_file():
            for axis in json.loads(state.read_text(encoding="utf-8")).get("axes", []):
                keys += [k for k in axis["keys"] if k not in keys]
    return keys


def write_report(paths: list[Path], out: Path, force: bool = False) -> dict[str, Path]:
    """Build every report file into `out` from the run folders in `paths`."""
    from peftlab.compare.plots import plot_report
    from peftlab.compare.summary import comparison_markdown, summary_markdown

    records, axes, forced = load_records_for_report(paths, force)
    kinds = {r.config.get("data.kind", "text") for r in records}
    quality = QUALITY[sorted(kinds)[0]]
    rows = [run_row(r, axes) for r in records]
    summary = summary_rows(rows, axes, quality)
    out.mkdir(parents=True, exist_ok=True)
    written = {"comparison.csv": out / "comparison.csv", "summary.csv": out / "summary.csv"}
    atomic_write_text(written["comparison.csv"], to_csv(rows))
    atomic_write_text(written["summary.csv"], to_csv(summary))
    plots = plot_report(records, rows, summary, quality, out / "plots")
    written["comparison.md"] = out / "comparison.md"
    atomic_write_text(written["comparison.md"], comparison_markdown(records, rows, summary, quality, forced))
    written["summary.md"] = out / "summary.md"
    atomic_write_text(written["summary.md"], summary_markdown(records, summary, quality, plots, forced, out))
    return {**written, **{p.name: p for p in plots}}
