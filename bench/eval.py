"""Benchmark peftlab's evaluation on SmolLM2-135M against plain one-at-a-time loops, in ONE run.

1. Perplexity over wikitext-2 test (the whole split unless --max-tokens cuts it): peftlab's batched
   sliding windows (evaluation.perplexity.score_tokens) versus the one-window-at-a-time loop of the
   transformers perplexity guide, written here independently. Same tokens, same L and S; figure:
   scored tokens per second, and the two perplexities (they agree within ~0.1%, not bitwise: the
   guide's window scores one target fewer, see tests/slow/test_eval_real.py).
2. Greedy generation: peftlab's batched, left-padded generate_greedy versus one `generate` call per
   prompt; figure: real new tokens per second (tokens after a row's EOS are not counted) and how
   many answers agree token for token.

The two sides run in turn for --repeats rounds, the order flipped each round, and the best time of
each is kept (the machine is shared).
Prints a table and writes bench/results/eval.json.

    PYTHONPATH=src .venv/bin/python bench/eval.py                      # whole wikitext-2 test split
    PYTHONPATH=src .venv/bin/python bench/eval.py --max-tokens 32768 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from peftlab.config.sections import DEFAULT_SAMPLE_PROMPTS, ModelConfig
from peftlab.evaluation.generation import generate_greedy
from peftlab.evaluation.perplexity import score_tokens
from peftlab.model.loading import load_model, load_tokenizer, pick_device, pick_dtype, resolve_source

ROOT = Path(__file__).resolve().parents[1]
WIKI_TEST = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


@torch.no_grad()
def guide_loop(model: torch.nn.Module, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """(perplexity, tokens scored) by the loop of huggingface.co/docs/transformers/perplexity: one
    window per forward pass, labels before the new targets masked."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        num_valid = int((target_ids[:, 1:] != -100).sum())  # the labels the loss averaged over
        nll_sum += loss.item() * num_valid
        n_tokens += num_valid
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@torch.no_grad()
def one_by_one(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    out = []
    for p in prompts:
        new = model.generate(
            input_ids=torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0, len(p) :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        out.append(new)
    return out


def timed(fn):  # -> (seconds, result)
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=None, help="cut wikitext-2 test to N tokens")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="windows (and prompts) per forward pass")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=8, help="how many of the default sample prompts")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's choice). On a machine shared with other jobs, 1 avoids "
        "the thread oversubscription that makes small matmuls 40x slower there",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    mcfg = ModelConfig(dtype=args.dtype)
    source = resolve_source(mcfg)
    tokenizer = load_tokenizer(source, mcfg)
    device = pick_device("cpu")
    dtype = pick_dtype(args.dtype, device)
    model = load_model(source, mcfg, device, dtype).eval()
    ids = tokenizer(WIKI_TEST.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    full_split = len(ids)
    ids = ids[: args.max_tokens] if args.max_tokens else ids

    with torch.no_grad():  # warm-up: first calls allocate and pick kernels
        model(torch.tensor([ids[: args.window]]))
    ppl: dict[str, list[float]] = {"peftlab": [], "guide": []}
    ours = guide = None
    for r in range(args.repeats):
        for side in ("peftlab", "guide") if r % 2 == 0 else ("guide", "peftlab"):  # flip the order
            if side == "peftlab":
                seconds, ours = timed(
                    lambda: score_tokens(
                        model,
                        ids,
                        args.window,
                        args.stride,
                        args.batch_size,
                        pad_id=tokenizer.pad_token_id,
                        progress=False,
                    )
                )
            else:
                seconds, guide = timed(
                    lambda: guide_loop(model, torch.tensor([ids]), args.window, args.stride)
                )
            ppl[side].append(seconds)
    assert ours is not None and guide is not None
    # peftlab scores every token but the first. The guide's windows lose their first target when
    # S = L (no context before it), so there it scores one token fewer per window.
    windows = -(-len(ids) // args.stride)
    guide_expected = len(ids) - 1 if args.stride < args.window else len(ids) - windows
    print(f"perplexity seconds: {ppl}; tokens scored: peftlab {ours.tokens}, guide {guide[1]}", flush=True)
    assert ours.tokens == len(ids) - 1 and guide[1] == guide_expected, (ours.tokens, guide[1], len(ids))

    prompts = [
        tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
        for p in DEFAULT_SAMPLE_PROMPTS[: args.prompts]
    ]
    generate_greedy(model, tokenizer, prompts[:2], 2, 2)  # warm-up
    gen: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    batched = single = None
    for r in range(args.repeats):
        for side in ("batched", "one_by_one") if r % 2 == 0 else ("one_by_one", "batched"):
            if side == "batched":
                seconds, batched = timed(
                    lambda: generate_greedy(model, tokenizer, prompts, args.max_new_tokens, args.batch_size)
                )
            else:
                seconds, single = timed(lambda: one_by_one(model, tokenizer, prompts, args.max_new_tokens))
            gen[side].append(seconds)
    assert batched is not None and single is not None
    new_batched, new_single = sum(map(len, batched)), sum(map(len, single))

    best = {k: min(v) for k, v in {**ppl, **gen}.items()}
    result = {
        "model": source.description,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "text": f"wikitext-2-raw-v1 wiki.test.raw, {len(ids)} of {full_split} tokens",
        "window": args.window,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "tokens_scored": ours.tokens,
        "peftlab_perplexity": ours.perplexity,
        "guide_perplexity": guide[0],
        "peftlab_seconds": best["peftlab"],
        "guide_seconds": best["guide"],
        "peftlab_tokens_per_s": ours.tokens / best["peftlab"],
        "guide_tokens_per_s": guide[1] / best["guide"],
        "perplexity_speed_ratio": best["guide"] / best["peftlab"],
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "new_tokens_batched": new_batched,
        "new_tokens_one_by_one": new_single,
        "batched_seconds": best["batched"],
        "one_by_one_seconds": best["one_by_one"],
        "batched_new_tokens_per_s": new_batched / best["batched"],
        "one_by_one_new_tokens_per_s": new_single / best["one_by_one"],
        "generation_speed_ratio": (new_batched / best["batched"]) / (new_single / best["one_by_one"]),
        "answers_identical": sum(a == b for a, b in zip(batched, single, strict=True)),
        "all_seconds": {**ppl, **gen},
    }
    print(f"{result['model']}, {result['dtype']}, {result['torch_threads']} threads; {result['text']}")
    print(f"{'':34}{'peftlab (batched)':>20}{'one at a time':>16}{'ratio':>8}")
    print(
        f"{'perplexity, scored tokens/s':34}{result['peftlab_tokens_per_s']:>20.1f}"
        f"{result['guide_tokens_per_s']:>16.1f}{result['perplexity_speed_ratio']:>8.2f}"
    )
    label = f"perplexity (L={args.window}, S={args.stride})"
    print(f"{label:34}{ours.perplexity:>20.4f}{guide[0]:>16.4f}")
    print(
        f"{'greedy generation, new tokens/s':34}{result['batched_new_tokens_per_s']:>20.1f}"
        f"{result['one_by_one_new_tokens_per_s']:>16.1f}{result['generation_speed_ratio']:>8.2f}"
    )
    print(
        f"generation: {len(prompts)} prompts, max {args.max_new_tokens} new tokens, batch {args.batch_size}; "
        f"{result['answers_identical']}/{len(prompts)} answers identical token for token"
    )
    out = ROOT / "bench" / "results" / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
