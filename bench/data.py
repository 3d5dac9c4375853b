"""Benchmark: tokenise and pack wikitext-2 with the SmolLM2 tokenizer (no model is loaded).

The shared copy of wikitext-2 has no train split (wiki.train.raw could not be brought here), so this
uses all the text there is: wiki.valid.raw + wiki.test.raw. Figures: tokens/s of tokenisation and of
packing, and the padding waste of packed blocks versus the naive one-document-per-row padded batches
(padded to the longest row of each batch) on the same documents.

    PYTHONPATH=src .venv/bin/python bench/data.py [--max-seq-len 1024] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from peftlab.config.sections import ModelConfig
from peftlab.data.packing import pack_examples
from peftlab.data.text import load_documents
from peftlab.model.loading import load_tokenizer, resolve_source

WIKI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw-v1"


def naive_padding_waste(lengths: list[int], batch_size: int) -> float:
    """One example per row, each batch padded to its longest row (the usual tutorial recipe)."""
    real = padded = 0
    for i in range(0, len(lengths), batch_size):
        batch = lengths[i : i + batch_size]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--split",
        default="wikitext_headings",
        choices=["wikitext_headings", "blank_lines"],
        help="documents = articles, or paragraphs (short examples, where packing matters most)",
    )
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_source(ModelConfig()), ModelConfig())
    docs = [
        d for name in ("wiki.valid.raw", "wiki.test.raw") for d in load_documents(WIKI / name, args.split)
    ]

    started = time.perf_counter()
    token_docs = [
        tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for d in docs
    ]
    tok_seconds = time.perf_counter() - started
    n_tokens = sum(len(d) for d in token_docs)

    # documents longer than a block are cut into block-sized pieces first (the same for both recipes)
    pieces = [d[i : i + args.max_seq_len] for d in token_docs for i in range(0, len(d), args.max_seq_len)]
    examples = [(p, p) for p in pieces]
    started = time.perf_counter()
    packed = pack_examples(examples, args.max_seq_len, packing=True)
    pack_seconds = time.perf_counter() - started
    naive = naive_padding_waste([len(p) for p in pieces], args.batch_size)
    result = {
        "data": "wikitext-2-raw-v1 wiki.valid.raw + wiki.test.raw (no train split in the shared copy)",
        "document_split": args.split,
        "documents": len(docs),
        "pieces": len(pieces),
        "tokens": n_tokens,
        "tokenise_seconds": tok_seconds,
        "tokenise_tokens_per_s": n_tokens / tok_seconds,
        "pack_seconds": pack_seconds,
        "pack_tokens_per_s": n_tokens / pack_seconds,
        "max_seq_len": args.max_seq_len,
        "batch_size": args.batch_size,
        "packed_rows": len(packed),
        "packed_padding_waste": packed.padding_waste,
        "naive_rows": len(pieces),
        "naive_padding_waste": naive,
    }
    for key, value in result.items():
        print(f"{key:24} {value:,.4f}" if isinstance(value, float) else f"{key:24} {value}")
    print(f"padding waste: packed {packed.padding_waste:.2%} vs naive padded {naive:.2%}")
    out = Path(__file__).parent / "results" / f"data-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
