"""Training speed of peftlab's LoRA against the plain script and the naive tutorial recipe.

SmolLM2-135M, LoRA r=8 (q,k,v,o), batch 4, the same steps, in ONE run, each case in its own
subprocess (so its peak RSS is its own):
- plain: transformers Trainer + peft over packed 512-token blocks (bench/methods.py's baseline);
- peftlab: `peftlab train` with the same data, method and settings (chunked loss; release_memory
  auto, which keeps glibc's default malloc where RAM is plentiful), and again with
  train.release_memory=true (freed memory returned at once: lower peak RSS, page-fault cost);
- naive: one wikitext line per example, padded to 512 (the recipe many tutorials use);
- plain_thp: the plain script with THP_MEM_ALLOC_ENABLE=1, the huge-page CPU allocation peftlab
  turns on at import (plain and naive run with PyTorch's default, as users' scripts do).
Tokens/s counts real (non-pad) tokens. Model FLOPs utilisation is against this CPU's fp32
torch.mm peak measured in the same run, with FLOPs per token from peftlab's estimator.
Goals: peftlab >= 1.15x plain tokens/s, <= 0.6x plain peak RSS, >= 5x naive tokens/s.

    .venv/bin/python bench/train_speed.py --steps 4 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import (
    BATCH,
    BLOCK,
    PLAIN_ENV,
    ROOT,
    TRAIN_TEXT,
    plain_lora_trainer,
    run_baseline,
    run_case,
    run_peftlab,
)


def run_naive(steps: int, out_dir: Path) -> dict:
    """One line per example, padded to BLOCK, labels masked on padding; Trainer + peft LoRA."""
    from transformers import AutoTokenizer

    from peftlab.config.sections import ModelConfig
    from peftlab.model.loading import resolve_source
    from peftlab.sizing.resources import ResourceMonitor

    path = resolve_source(ModelConfig()).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    lines = [ln for ln in TRAIN_TEXT.read_text().splitlines() if ln.strip()][: steps * BATCH]
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=BLOCK, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    data = [
        {"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": labels[i]}
        for i in range(len(lines))
    ]
    trainer: Any = plain_lora_trainer(path, data, steps, out_dir / "naive")
    with ResourceMonitor() as monitor:
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    real = int(enc["attention_mask"].sum())
    return {
        "case": "naive: one line per example, padded to 512",
        "tokens_per_second": real / seconds,
        "peak_rss_gib": monitor.peak_rss / 2**30,
        "padding_share": 1 - real / enc["attention_mask"].numel(),
    }


def lora_flops_per_token() -> float:
    from peftlab.config.loading import validate_config
    from peftlab.model.loading import read_model_config, resolve_source
    from peftlab.sizing.estimate import estimate_memory
    from peftlab.sizing.plan import flops_per_token

    cfg = validate_config(
        {"data": {"train_path": "x", "block_size": BLOCK}, "method": {"name": "lora", "r": 8, "alpha": 16},
         "train": {"batch_size": BATCH}}
    )  # fmt: skip
    config = read_model_config(resolve_source(cfg.model, weights=False), cfg.model)
    return flops_per_token(estimate_memory(cfg, config, __import__("torch").float32, 0), False)


def matmul_peak() -> float:
    """This CPU's fp32 torch.mm peak: the best of many short timings over square sizes and the
    model's own linear shapes (a peak is a best case; an average over seconds on a shared VM
    mixes in whatever else ran and gave an 'MFU' above 100%)."""
    import torch

    rows = BATCH * BLOCK
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (rows, 576, 1536), (rows, 1536, 576), (576, 576, rows)]
    best = 0.0
    generator = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
        a @ b
        for _ in range(10):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
    return best


def versus(ours: dict, plain: dict) -> dict:
    return {
        "tokens_per_second_ratio": ours["tokens_per_second"] / plain["tokens_per_second"],
        "peak_rss_ratio": ours["peak_rss_gib"] / plain["peak_rss_gib"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="runs of plain and lora each (medians)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out_dir = Path(args.out)
    if args.one:
        runners = {"plain": run_baseline, "plain_thp": run_baseline, "naive": run_naive, "lora": run_peftlab}
        if args.one in ("lora", "lora_release"):
            from peftlab.cpu.huge_pages import for_this_command

            with for_this_command():  # what the `peftlab` command sets up before torch loads
                if args.one == "lora":
                    result = run_peftlab("lora", args.steps, out_dir / "runs")
                else:  # freed memory back to the system: lower peak RSS, slower
                    result = run_peftlab("lora", args.steps, out_dir / "runs", release_memory=True)
                    result["case"] = "lora, train.release_memory=true"
        else:
            result = runners[args.one](args.steps, out_dir / "runs")
            if args.one == "plain_thp":
                result["case"] += ", THP_MEM_ALLOC_ENABLE=1"
        print("RESULT " + json.dumps(result))
        return
    peak = matmul_peak()
    fpt = lora_flops_per_token()
    print(f"CPU fp32 torch.mm peak: {peak / 1e9:.1f} GFLOP/s; LoRA training FLOPs/token: {fpt / 1e9:.3f} G")
    rows = {}
    # plain and naive run with PyTorch's default allocator, as users' scripts do; plain_thp is the
    # plain script given the huge-page allocation peftlab turns on, to show what that part is worth.
    envs = {"plain": PLAIN_ENV, "naive": PLAIN_ENV, "plain_thp": {"THP_MEM_ALLOC_ENABLE": "1"}}
    # plain and lora alternate `repeat` times (timing noise on a VM is about +-5%); medians are kept.
    order = ["plain", "lora"] * args.repeat + ["plain_thp", "lora_release", "naive"]
    runs: dict[str, list[dict]] = {}
    for case in order:
        r = run_case(case, args.steps, out_dir, Path(__file__), env=envs.get(case))
        if r is None:
            continue
        r["mfu"] = r["tokens_per_second"] * fpt / peak
        runs.setdefault(case, []).append(r)
        print(
            f"{r['case'][:44]:44s} {r['tokens_per_second']:7.1f} real tok/s  {r['peak_rss_gib']:5.2f} GiB  "
            f"MFU {r['mfu']:.0%}",
            flush=True,
        )
    for case, results in runs.items():
        rows[case] = {
            **results[len(results) // 2],
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in results),
            "peak_rss_gib": statistics.median(r["peak_rss_gib"] for r in results),
            "runs": [{k: r[k] for k in ("tokens_per_second", "peak_rss_gib")} for r in results],
        }
        rows[case]["mfu"] = rows[case]["tokens_per_second"] * fpt / peak
    summary: dict = {
        "steps": args.steps,
        "repeat": args.repeat,
        "cpu_peak_flops": peak,
        "flops_per_token": fpt,
        "rows": rows,
    }
    for case, base, key, label in [
        ("lora", "plain", "peftlab_vs_plain", "peftlab (release_memory=auto)"),
        ("lora_release", "plain", "peftlab_release_vs_plain", "peftlab (release_memory=true)"),
        ("lora", "plain_thp", "peftlab_vs_plain_thp", "peftlab (release_memory=auto) / plain+THP"),
    ]:
        if {base, case} <= rows.keys():
            summary[key] = versus(rows[case], rows[base])
            print(
                f"{label} / {base}: {summary[key]['tokens_per_second_ratio']:.2f}x tokens/s (goal >= 1.15), "
                f"{summary[key]['peak_rss_ratio']:.2f}x peak RSS (goal <= 0.60)"
            )
    if {"naive", "lora"} <= rows.keys():
        ratio = rows["lora"]["tokens_per_second"] / rows["naive"]["tokens_per_second"]
        summary["peftlab_vs_naive"] = ratio
        print(f"peftlab / naive padded: {ratio:.2f}x real tokens/s (goal >= 5)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_speed.json").write_text(json.dumps(summary, indent=2))
    print(f"written {out_dir / 'train_speed.json'}")


if __name__ == "__main__":
    main()
