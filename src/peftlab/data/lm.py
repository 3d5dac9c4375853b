"""Language-modelling data: raw text -> documents -> tokens -> training blocks."""

from __future__ import annotations

from typing import Any

from peftlab.config.sections import DataConfig
from peftlab.data.packing import Blocks, group_concatenated, group_per_document
from peftlab.data.text import load_documents
from peftlab.errors import DataError


def tokenize_documents(tokenizer: Any, docs: list[str], max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per document, without special tokens; stops early once max_tokens are collected."""
    out: list[list[int]] = []
    total = 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        out.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def build_train_blocks(cfg: DataConfig, tokenizer: Any) -> Blocks:
    return build_blocks(cfg.train_path, cfg, tokenizer, cfg.max_train_tokens, "data.max_train_tokens")


def build_blocks(
    path: str, cfg: DataConfig, tokenizer: Any, max_tokens: int | None = None, cap_key: str = ""
) -> Blocks:
    """Blocks of the text at `path`, cut as the config says (concatenated or per document)."""
    docs = load_documents(path, cfg.document_split)
    token_docs = tokenize_documents(tokenizer, docs, max_tokens)
    if cfg.keep_documents_apart:
        blocks = group_per_document(
            token_docs, cfg.block_size, tokenizer.eos_token_id, tokenizer.pad_token_id, max_tokens
        )
    else:
        blocks = group_concatenated(token_docs, cfg.block_size, tokenizer.eos_token_id, max_tokens)
    if len(blocks) == 0:
        total = sum(len(d) for d in token_docs)
        if max_tokens is not None and total > max_tokens:
            raise DataError(
                f"{cap_key}={max_tokens} is fewer than one block of data.block_size={cfg.block_size}"
            )
        raise DataError(
            f"{path} gives {total} tokens, fewer than one block of data.block_size={cfg.block_size}"
        )
    return blocks


def build_eval_tokens(cfg: DataConfig, tokenizer: Any) -> tuple[list[int], str]:
    """The evaluation text as one token stream (documents joined as in the file) and that text."""
    if cfg.eval_path is None:
        raise DataError("data.eval_path is not set; evaluation needs held-out text")
    text = "".join(load_documents(cfg.eval_path, "file"))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if cfg.max_eval_tokens is not None:
        ids = ids[: cfg.max_eval_tokens]
        text = tokenizer.decode(ids)
    if len(ids) < 2:
        raise DataError(f"{cfg.eval_path} gives fewer than 2 tokens to evaluate")
    return ids, text
