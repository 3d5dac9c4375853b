"""Benchmark every registered method on SmolLM2-135M against a plain Trainer + peft LoRA script.

Same wikitext-2 blocks (512 tokens, batch 4), same number of steps, same seed, in ONE run; each
case runs in a fresh subprocess so that peak RSS is its own. Prints a table and writes
bench/results/methods.json.

    .venv/bin/python bench/methods.py              # every method + baseline
    .venv/bin/python bench/methods.py --steps 4 --methods lora full
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRAIN_TEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.valid.raw"
TEST_TEXT = TRAIN_TEXT.with_name("wiki.test.raw")
BLOCK, BATCH, SEED = 512, 4, 0
# The plain script runs with PyTorch's default CPU allocator, as a user's script would; a peftlab
# child runs as the `peftlab` command does, with transparent-huge-page allocation for its process
# (cpu/huge_pages.py: set before torch is imported, as cli.main does).
PLAIN_ENV = {"THP_MEM_ALLOC_ENABLE": "0"}
CASES = {
    "full": {"name": "full"},
    "full-8bit": {"name": "full", "optimizer": "adamw_8bit"},
    "freeze": {"name": "freeze", "last_layers": 2},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "dora": {"name": "dora", "r": 8, "alpha": 16},
    "qlora": {"name": "qlora", "r": 8, "alpha": 16},
    "lora_galore": {"name": "lora_galore", "r": 8, "alpha": 16, "rank": 64, "update_proj_gap": 50},
    "galore": {"name": "galore", "rank": 64, "update_proj_gap": 50},
    "ia3": {"name": "ia3"},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 16},
    "prefix_tuning": {"name": "prefix_tuning", "num_virtual_tokens": 16},
}


def run_peftlab(case: str, steps: int, out_dir: Path, eval_tokens: int = 0, **train_extra: object) -> dict:
    """peftlab's own train(); with eval_tokens, held-out perplexity on that many wiki.test.raw tokens."""
    from peftlab.config.loading import validate_config
    from peftlab.train.recipe import train

    cfg = validate_config(
        {
            # document_split=file: the same token stream as the baseline, which tokenises the file whole
            "data": {
                "train_path": str(TRAIN_TEXT),
                "document_split": "file",
                "block_size": BLOCK,
                "max_train_tokens": BLOCK * BATCH * steps,
                "validation_fraction": 0,  # the baseline has no validation pass either
                "eval_path": str(TEST_TEXT),
                "max_eval_tokens": max(eval_tokens, 2),
            },
            "method": CASES[case],
            "train": {
                "max_steps": steps,
                "batch_size": BATCH,
                "lr": 1e-4,
                "seed": SEED,
                "lr_scheduler": "constant",
                **train_extra,
            },
            "eval": {"enabled": eval_tokens > 0, "window": BLOCK, "stride": BLOCK},
            "output": {"dir": str(out_dir), "name": case},
        }
    )
    metrics = train(cfg, progress=False).metrics
    return {
        "case": case,
        "tokens_per_second": metrics["tokens_per_second"],
        "peak_rss_gib": metrics["memory"]["peak_rss_bytes"] / 2**30,
        "trainable_params": metrics["trainable_params"],
        "final_loss": metrics["final_logged_loss"],
        "base_weights_mib": metrics["base_weights_bytes"] / 2**20,
        "estimated_peak_gib": metrics["estimate"]["total"] / 2**30,
        "estimate": metrics["estimate"],
        "memory_split": metrics["memory_split"],
        "loss_impl": metrics["loss_impl"],
        "base_perplexity": metrics.get("base", {}).get("perplexity"),
        "tuned_perplexity": metrics.get("tuned", {}).get("perplexity"),
    }


def plain_lora_trainer(path: str, data: list, steps: int, output_dir: Path, collator: Any = None) -> Any:
    """A plain transformers Trainer over peft LoRA (r=8, alpha 16, q,k,v,o) with the bench's
    settings: what a user would write without peftlab. Shared by the baselines of every bench."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from peftlab.model.loading import pick_device, pick_dtype

    device = pick_device("auto")
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype("auto", device)).to(device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"
        ),
    )
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=1e-4,
        lr_scheduler_type="constant", seed=SEED, report_to=[], disable_tqdm=True, logging_steps=1,
        use_cpu=device.type == "cpu", save_strategy="no",
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=data, data_collator=collator)


def run_baseline(steps: int, out_dir: Path) -> dict:
    """The plain recipe: tokenise the text, cut 512-token blocks, Trainer + peft LoRA (q,k,v,o)."""
    import torch
    from transformers import AutoTokenizer, default_data_collator

    from peftlab.config.sections import ModelConfig
    from peftlab.model.loading import resolve_source
    from peftlab.sizing.resources import ResourceMonitor

    path = resolve_source(ModelConfig()).path  # the same cached SmolLM2 folder, the dtype peftlab picks
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TRAIN_TEXT.read_text(), add_special_tokens=False)["input_ids"][: BLOCK * BATCH * steps]
    blocks = [ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]
    data = [
        {
            "input_ids": torch.tensor(b),
            "labels": torch.tensor(b),
            "attention_mask": torch.ones(BLOCK, dtype=torch.long),
        }
        for b in blocks
    ]
    trainer: Any = plain_lora_trainer(path, data, steps, out_dir / "baseline", default_data_collator)
    model = trainer.model
    with ResourceMonitor() as monitor:
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "case": "baseline: Trainer + peft LoRA",
        "tokens_per_second": len(data) * BLOCK / seconds,
        "peak_rss_gib": monitor.peak_rss / 2**30,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "final_loss": losses[-1],
        "base_weights_mib": None,
    }


def release_option(release: bool) -> dict:
    return {"release_memory": True} if release else {}


def run_case(
    case: str,
    steps: int,
    out_dir: Path,
    script: Path | None = None,
    eval_tokens: int = 0,
    release_memory: bool = False,
    env: dict[str, str] | None = None,
) -> dict | None:
    """One case in a fresh subprocess (so its peak RSS is its own), with `env` added to its
    environment; None when it failed."""
    extra = ["--eval-tokens", str(eval_tokens)] if eval_tokens else []
    extra += ["--release-memory"] if release_memory else []
    command = [sys.executable, str(script or __file__), "--one", case, "--steps", str(steps)]
    proc = subprocess.run(
        [*command, "--out", str(out_dir), *extra],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[7:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=list(CASES))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--eval-tokens", type=int, default=0, help="held-out perplexity on this many wiki.test.raw tokens"
    )
    parser.add_argument("--no-baseline", action="store_true", help="peftlab methods only")
    parser.add_argument(
        "--release-memory", action="store_true", help="train.release_memory=true (peak RSS ~ live memory)"
    )
    args = parser.parse_args()
    out_dir = Path(args.out)
    if args.one:  # child process: one case, one JSON line
        if args.one == "baseline":
            result = run_baseline(args.steps, out_dir / "runs")
        else:
            from peftlab.cpu.huge_pages import for_this_command

            with for_this_command():  # what the `peftlab` command sets up before torch loads
                result = run_peftlab(
                    args.one,
                    args.steps,
                    out_dir / "runs",
                    args.eval_tokens,
                    **release_option(args.release_memory),
                )
        print("RESULT " + json.dumps(result))
        return
    import shutil

    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    rows = []
    for case in ([] if args.no_baseline else ["baseline"]) + args.methods:
        result = run_case(
            case,
            args.steps,
            out_dir,
            eval_tokens=args.eval_tokens,
            release_memory=args.release_memory,
            env=PLAIN_ENV if case == "baseline" else None,
        )
        if result is None:
            continue
        rows.append(result)
        r = rows[-1]
        print(
            f"{r['case']:32s} {r['tokens_per_second']:8.1f} tok/s  {r['peak_rss_gib']:6.2f} GiB  "
            f"{r['trainable_params']:>12,d} trainable  loss {r['final_loss']:.4f}"
            + (
                f"  ppl {r['base_perplexity']:.2f} -> {r['tuned_perplexity']:.2f}"
                if r.get("tuned_perplexity")
                else ""
            )
            + (f"  estimated peak {r['estimated_peak_gib']:.2f} GiB" if r.get("estimated_peak_gib") else ""),
            flush=True,
        )
    base = rows[0] if rows and rows[0]["case"].startswith("baseline") else None
    lora = next((r for r in rows if r["case"] == "lora"), None)
    summary = {"steps": args.steps, "block": BLOCK, "batch": BATCH, "rows": rows}
    if base and lora:
        summary["lora_vs_baseline"] = {
            "tokens_per_second_ratio": lora["tokens_per_second"] / base["tokens_per_second"],
            "peak_rss_ratio": lora["peak_rss_gib"] / base["peak_rss_gib"],
        }
        print(
            f"\npeftlab lora / baseline: {summary['lora_vs_baseline']['tokens_per_second_ratio']:.2f}x tokens/s, "
            f"{summary['lora_vs_baseline']['peak_rss_ratio']:.2f}x peak RSS"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "methods-quality.json" if args.eval_tokens else "methods.json"
    (out_dir / name).write_text(json.dumps(summary, indent=2))
    print(f"written {out_dir / name}")


if __name__ == "__main__":
    main()
