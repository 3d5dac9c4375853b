"""The fixed inputs every model of a run is scored on, built once from the config and the held-out
data so base and tuned see the same tokens: held-out text, label prompts, chat prompts with their
reference answers, the general text for forgetting, the sample prompts. Bad evaluation settings fail
here, before any model runs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peftlab.config.run import RunConfig
from peftlab.config.sections import DEFAULT_FORGETTING_TEXT, EvalConfig
from peftlab.data.lm import build_eval_tokens
from peftlab.data.task import TaskData
from peftlab.data.templates import (
    assistant_spans,
    build_chat_prompt,
    build_classification_prompt,
    merge_system,
    template_for,
)
from peftlab.data.text import load_documents
from peftlab.errors import DataError
from peftlab.evaluation.held_out_text import EvalData


@dataclass
class ChatItem:
    prompt_ids: list[int]  # the conversation before the reference reply, with the generation prompt
    answer_ids: list[int]  # the reference reply and its end-of-turn token (what training scores)
    reference: str  # the reference reply's text, for BLEU and ROUGE


@dataclass
class EvalInputs:
    """Everything a model is scored on, fixed once so base and tuned see the same tokens."""

    kind: str
    lm: EvalData | None = None
    class_prompts: list[str] = field(default_factory=list)
    class_gold: list[str] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    chat: list[ChatItem] = field(default_factory=list)
    general: EvalData | None = None
    general_skipped: str | None = None  # why forgetting is not measured
    sample_prompts: list[str] = field(default_factory=list)
    sample_ids: list[list[int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """sha256 of every input a score depends on (tokens, prompts, references, labels)."""
        content = {
            "kind": self.kind,
            "lm": [self.lm.ids, self.lm.source, self.lm.documents] if self.lm else None,
            "classification": [self.class_prompts, self.class_gold, self.label_names],
            "chat": [asdict(item) for item in self.chat],
            "general": [self.general.ids, self.general.source] if self.general else None,
            "general_skipped": self.general_skipped,
            "samples": [self.sample_prompts, self.sample_ids],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


# --- inputs ----------------------------------------------------------------------------------


def first_tokens(tokenizer: Any, text: str, n: int, margin: int = 64) -> list[int]:
    """The first n tokens of `text` without tokenising all of it: tokenise a prefix that yields at
    least n + margin tokens (doubling it as needed), so the cut at the prefix's end, which can change
    its last few tokens, lies well past the n tokens kept."""
    chars = 8 * (n + margin)
    while True:
        ids: list[int] = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text) or len(ids) >= n + margin:
            return ids[:n]
        chars *= 2


def general_text(cfg: EvalConfig, tokenizer: Any) -> tuple[EvalData | None, str | None]:
    """The forgetting text (first forgetting_max_tokens tokens), or None and the reason it is skipped."""
    if cfg.forgetting_path is None:
        return None, "eval.forgetting_path is null"
    path = Path(DEFAULT_FORGETTING_TEXT if cfg.forgetting_path == "auto" else cfg.forgetting_path)
    if not path.is_file():
        if cfg.forgetting_path == "auto":
            return None, (
                f"default general text {path} not found (relative to {Path.cwd()}); "
                "set eval.forgetting_path to a text file"
            )
        raise DataError(f"eval.forgetting_path: file not found: {path}")
    ids = first_tokens(tokenizer, "".join(load_documents(path, "file")), cfg.forgetting_max_tokens)
    if len(ids) < 2:
        raise DataError(f"eval.forgetting_path: {path} gives fewer than 2 tokens")
    return EvalData(ids, str(path)), None


def sample_prompt_ids(prompts: list[str], tokenizer: Any, cfg: RunConfig) -> list[list[int]]:
    """Each prompt as one user turn with the chat template's generation prompt (the model's own
    template, or data.chat_template for chat data); plain text for a tokenizer without a template."""
    use_template = cfg.data.kind == "chat" or getattr(tokenizer, "chat_template", None)
    texts = [
        build_chat_prompt([{"role": "user", "content": p}], tokenizer, cfg.data.chat_template)
        if use_template
        else p
        for p in prompts
    ]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def chat_item(messages: list[dict[str, str]], tokenizer: Any, template_choice: str) -> ChatItem | None:
    """Prompt = everything before the last assistant reply, rendered exactly as training renders
    it; None when the record has no assistant reply."""
    template = template_for(tokenizer, template_choice)
    messages = merge_system(messages, tokenizer, template)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    full, spans = assistant_spans(messages[: last + 1], tokenizer, template)
    start, end = spans[-1]
    prompt = tokenizer(full[:start], add_special_tokens=False)["input_ids"]
    answer = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
    return ChatItem(list(prompt), list(answer), messages[last]["content"])


def build_eval_inputs(cfg: RunConfig, tokenizer: Any, task: TaskData) -> EvalInputs:
    """Fix the evaluation inputs for cfg.data.kind; bad settings fail here, before any model runs."""
    kind, limit = cfg.data.kind, cfg.eval.max_examples
    inputs = EvalInputs(kind=kind)
    if kind == "text" or cfg.data.eval_path:
        ids, text = build_eval_tokens(cfg.data, tokenizer)
        inputs.lm = EvalData(ids, str(cfg.data.eval_path), documents=[text])
    records = task.test_records
    if kind in ("classification", "chat") and not records:
        raise DataError(
            f"{cfg.data.train_path}: no held-out records to evaluate; set data.test_path or "
            "data.test_fraction > 0, or eval.enabled=false"
        )
    if kind == "classification":
        inputs.label_names = list(task.label_names or [])
        chosen = records[:limit]
        outside = sorted({r["label"] for r in chosen} - set(inputs.label_names))
        if outside:
            raise DataError(f"held-out labels {outside} are not in the label set {inputs.label_names}")
        inputs.class_prompts = [
            build_classification_prompt(r["text"], cfg.data.prompt_template) for r in chosen
        ]
        inputs.class_gold = [r["label"] for r in chosen]
    elif kind == "chat":
        counts = inputs.counts
        counts.update(prompts_cut_left=0, skipped_no_reply=0, skipped_answer_too_long=0)  # 0s stated too
        for rec in records:
            item = chat_item(rec["messages"], tokenizer, cfg.data.chat_template)
            # prompt + the longer of reference and generated answer must fit data.max_seq_len;
            # a long conversation keeps its latest turns (the prompt is cut on the left)
            room = cfg.data.max_seq_len - max(len(item.answer_ids) if item else 0, cfg.eval.max_new_tokens)
            if item is None:
                counts["skipped_no_reply"] += 1
            elif room < 1:
                counts["skipped_answer_too_long"] += 1
            else:
                if len(item.prompt_ids) > room:
                    item.prompt_ids = item.prompt_ids[-room:]
                    counts["prompts_cut_left"] += 1
                inputs.chat.append(item)
            if limit is not None and len(inputs.chat) == limit:
                break
        if not inputs.chat:
            raise DataError(
                f"no held-out conversation has an assistant reply that fits data.max_seq_len="
                f"{cfg.data.max_seq_len} with eval.max_new_tokens={cfg.eval.max_new_tokens}"
            )
    inputs.general, inputs.general_skipped = general_text(cfg.eval, tokenizer)
    inputs.sample_prompts = list(cfg.eval.sample_prompts)
    inputs.sample_ids = sample_prompt_ids(inputs.sample_prompts, tokenizer, cfg)
    return inputs
