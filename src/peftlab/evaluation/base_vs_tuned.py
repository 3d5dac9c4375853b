"""Base versus tuned: forgetting on general text and side-by-side answers."""

from __future__ import annotations

import json
from pathlib import Path

from peftlab.evaluation.perplexity import LMScores


def forgetting(base: LMScores, tuned: LMScores) -> dict[str, float | int]:
    """Per-token cross-entropy on the same general held-out text after tuning minus before
    (positive = the method cost something outside the task)."""
    if (base.tokens, base.window, base.stride) != (tuned.tokens, tuned.window, tuned.stride):
        raise ValueError("forgetting needs base and tuned scored on the same tokens with the same window")
    return {
        "base_ce": base.mean_nll,
        "tuned_ce": tuned.mean_nll,
        "forgetting": tuned.mean_nll - base.mean_nll,
        "tokens": base.tokens,
        "window": base.window,
        "stride": base.stride,
    }


def write_samples(run_dir: Path, prompts: list[str], base: list[str], tuned: list[str]) -> None:
    """samples.jsonl (one record per prompt) and samples.md (readable) in the run folder."""
    rows = [{"prompt": p, "base": b, "tuned": t} for p, b, t in zip(prompts, base, tuned, strict=True)]
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    (run_dir / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    md = ["# Side by side (greedy decoding)", ""]
    for i, r in enumerate(rows, 1):
        md += [f"## {i}. {r['prompt']}", "", "**base**", "", r["base"], "", "**tuned**", "", r["tuned"], ""]
    (run_dir / "samples.md").write_text("\n".join(md), encoding="utf-8")
