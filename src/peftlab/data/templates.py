"""Prompts and loss masks: chat templates (assistant-only loss), classification prompt + label.

The functions that build a prompt here are the ones serving and evaluation call, so that a served
model sees exactly the prompt it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from peftlab.data.packing import IGNORE_INDEX
from peftlab.errors import DataError

# chatml for tokenizers without a template; each turn ends with the tokenizer's own EOS token so a
# base model that lacks <|im_end|> still learns to stop on a token it has.
CHATML_FALLBACK = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss


def template_for(tokenizer: Any, choice: str = "model") -> str:
    if choice == "model" and getattr(tokenizer, "chat_template", None):
        return str(tokenizer.chat_template)
    return CHATML_FALLBACK


def _render(tokenizer: Any, messages: list[dict[str, str]], template: str, generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def merge_system(messages: list[dict[str, str]], tokenizer: Any, template: str) -> list[dict[str, str]]:
    """Keep system messages where the template accepts them; else merge them into the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    try:
        _render(tokenizer, messages, template, False)
        return messages
    except TemplateError:
        system, rest = messages[0]["content"], list(messages[1:])
        if rest and rest[0]["role"] == "user":
            rest[0] = {"role": "user", "content": f"{system}\n\n{rest[0]['content']}"}
        return rest


def build_chat_prompt(messages: list[dict[str, str]], tokenizer: Any, template_choice: str = "model") -> str:
    """The text a model sees before it writes its next assistant reply (training and serving alike)."""
    template = template_for(tokenizer, template_choice)
    return _render(tokenizer, merge_system(messages, tokenizer, template), template, True)


def assistant_spans(
    messages: list[dict[str, str]], tokenizer: Any, template: str
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant reply (with its end token).

    Each span runs from the end of the prompt that precedes the reply (rendered with the generation
    prompt, exactly as build_chat_prompt does) to the end of the reply's turn, trailing whitespace cut.
    """
    full = _render(tokenizer, messages, template, False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], template, True)
        upto = _render(tokenizer, messages[: i + 1], template, False)
        if not full.startswith(upto) or not upto.startswith(prompt):
            raise DataError(
                "the chat template does not render conversations prefix by prefix; use data.chat_template=chatml"
            )
        end = len(upto.rstrip())
        spans.append((len(prompt), end))
    return full, spans


def tokenize_chat(
    messages: list[dict[str, str]], tokenizer: Any, template_choice: str, train_on: str
) -> Example:
    """Token ids and labels; with train_on=assistant only assistant replies (and their end token) carry loss."""
    template = template_for(tokenizer, template_choice)
    messages = merge_system(messages, tokenizer, template)
    full, spans = assistant_spans(messages, tokenizer, template)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (start, end) in enumerate(enc["offset_mapping"]):
        if train_on == "all" or any(s <= start and end <= e and start < end for s, e in spans):
            labels[t] = ids[t]
    return Example(ids, labels)


def build_classification_prompt(text: str, prompt_template: str) -> str:
    """The prompt of a classification example; the label follows it as ' <label>'."""
    return prompt_template.format(text=text)


def label_completion(label: str) -> str:
    return f" {label}"


def tokenize_classification(text: str, label: str, tokenizer: Any, prompt_template: str) -> Example:
    """Prompt tokens (no loss) followed by the label tokens (loss only there)."""
    prompt = tokenizer(build_classification_prompt(text, prompt_template), add_special_tokens=False)[
        "input_ids"
    ]
    answer = tokenizer(label_completion(label), add_special_tokens=False)["input_ids"]
    return Example(list(prompt) + list(answer), [IGNORE_INDEX] * len(prompt) + list(answer))
