"""Estimated versus measured peak memory, and the "will it fit" table for larger models.

Part 1: every method on SmolLM2-135M (wikitext-2 blocks of 512 tokens, batch 4, same data), each
trained for a few steps in its own subprocess (bench/methods.py); the estimate is the one
`peftlab train` prints before loading anything, the measurement is the run's sampled peak RSS.
The goal: within 15% for every method.
Part 2: the estimates for Llama-3.2-1B, Mistral-7B and Gemma-7B (architecture numbers in
tests/fixtures/configs) for full, LoRA, QLoRA and GaLore on a 15 GB T4 and a 24 GB RTX 4090,
written as a Markdown table (docs/will-it-fit.md holds a copy).

    .venv/bin/python bench/estimate.py                    # both parts
    .venv/bin/python bench/estimate.py --steps 2 --methods lora full
    .venv/bin/python bench/estimate.py --table-only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import CASES, ROOT, run_case

FIXTURES = ROOT / "tests" / "fixtures" / "configs"
MODELS = ["llama-3.2-1b", "mistral-7b", "gemma-7b"]
TABLE_METHODS = {
    "full": {"name": "full"},
    "lora r=16": {"name": "lora", "r": 16, "target_modules": "all-linear"},
    "qlora r=16": {"name": "qlora", "r": 16, "target_modules": "all-linear"},
    "galore r=128": {"name": "galore", "rank": 128},
}
GPUS = ["t4", "4090"]
SHAPE = {"batch_size": 1, "seq": 512}


def measured_vs_estimated(methods: list[str], steps: int, out_dir: Path) -> list[dict]:
    rows = []
    for case in methods:
        # release_memory=true: peak RSS is then the live memory the estimate counts (glibc's default
        # malloc keeps up to ~1.7x more; see src/peftlab/cpu/malloc.py)
        r = run_case(case, steps, out_dir, ROOT / "bench" / "methods.py", release_memory=True)
        if r is None:
            continue
        ratio = r["estimated_peak_gib"] / r["peak_rss_gib"]
        rows.append({**r, "estimate_over_measured": ratio})
        print(
            f"{case:14s} estimated {r['estimated_peak_gib']:5.2f} GiB  measured {r['peak_rss_gib']:5.2f} GiB  "
            f"ratio {ratio:4.2f}  {'ok' if abs(ratio - 1) <= 0.15 else 'OFF BY >15%'}",
            flush=True,
        )
    return rows


def fit_table() -> tuple[str, list[dict]]:
    from transformers import AutoConfig

    from peftlab.config.loading import validate_config
    from peftlab.sizing.plan import GPUS as GPU_SPECS
    from peftlab.sizing.plan import plan
    from peftlab.sizing.resources import gib

    rows, lines = [], []
    header = (
        "| model | method | "
        + " | ".join(f"{GPU_SPECS[g].name}: peak / fits / largest batch" for g in GPUS)
        + " |"
    )
    lines += [header, "|" + "---|" * (2 + len(GPUS))]
    for model in MODELS:
        config = AutoConfig.from_pretrained(FIXTURES / f"{model}.json")
        for label, method in TABLE_METHODS.items():
            cells = []
            for gpu in GPUS:
                cfg = validate_config(
                    {
                        "model": {"name": str(FIXTURES / f"{model}.json")},
                        "data": {"train_path": "x", "block_size": SHAPE["seq"]},
                        "method": method,
                        "train": {"batch_size": SHAPE["batch_size"]},
                    }
                )
                p = plan(cfg, config, gpu=gpu)
                rows.append(
                    {"model": model, "method": label, "gpu": gpu, "peak_gib": p.memory.total / 2**30,
                     "fits": p.fits, "largest_batch": p.largest_batch, "advice": p.advice,
                     "tokens_per_second": p.tokens_per_second, "memory": p.memory.as_dict()}
                )  # fmt: skip
                verdict = "yes" if p.fits else "no"
                cells.append(f"{gib(p.memory.total)} / {verdict} / {p.largest_batch}")
            lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines), rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    summary: dict = {}
    if not args.table_only:
        print(f"SmolLM2-135M, 512 x 4 tokens, {args.steps} steps: estimated vs measured peak RSS")
        summary["smollm2"] = measured_vs_estimated(args.methods, args.steps, out_dir)
        worst = max((abs(r["estimate_over_measured"] - 1) for r in summary["smollm2"]), default=0.0)
        print(f"largest deviation: {worst:.1%} (goal: within 15%)\n")
    print(f"will it fit: batch {SHAPE['batch_size']} x {SHAPE['seq']} tokens, no gradient checkpointing")
    table, rows = fit_table()
    summary["will_it_fit"] = rows
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "estimate.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "will-it-fit.md").write_text(table + "\n")
    print(f"written {out_dir / 'estimate.json'} and {out_dir / 'will-it-fit.md'}")


if __name__ == "__main__":
    main()
