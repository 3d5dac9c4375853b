"""Normalise raw records into the three record kinds every other module consumes:

    {"text": str}                                   language modelling
    {"text": str, "label": str}                     classification (label is a label NAME)
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}   chat

Formats: raw text, Alpaca, ShareGPT, OpenAI-style messages, prompt/completion, classification.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from peftlab.data.loading import RawRecord
from peftlab.errors import DataError

ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# Turns of tools and function calls: no chat template here renders them, so they are dropped
# (counted in unknown_role_messages_dropped); any other role is a bad record (a typo would silently
# drop turns).
DROPPED_ROLES = {"tool", "function", "function_call", "tool_call", "ipython", "observation"}
KNOWN_ROLES = "system, user (human, prompter), assistant (gpt, bot, model)"
# Canonical field names per format; `fields` in the config maps them to the data's own names.
FORMAT_FIELDS: dict[str, list[str]] = {
    "text": ["text"],
    "alpaca": ["instruction", "output"],
    "sharegpt": ["conversations"],
    "messages": ["messages"],
    "prompt_completion": ["prompt", "completion"],
    "classification": ["text", "label"],
}


class Skipped(Exception):
    """A bad record; raised as DataError with on_error=fail, counted with on_error=skip."""


def detect_format(fields: dict[str, Any], mapping: dict[str, str]) -> str:
    present = set(fields)
    for fmt in ("sharegpt", "messages", "alpaca", "prompt_completion", "classification"):
        if all(mapping.get(f, f) in present for f in FORMAT_FIELDS[fmt]):
            return fmt
    if mapping.get("text", "text") in present:
        return "text"
    raise DataError(
        f"cannot detect the data format from fields {sorted(present)}; set data.format "
        f"({', '.join(FORMAT_FIELDS)}) and data.fields to map names"
    )


def _get(rec: RawRecord, name: str, mapping: dict[str, str], required: bool = True) -> Any:
    key = mapping.get(name, name)
    if key not in rec.fields:
        if not required:
            return None
        raise Skipped(f"{rec.where}: missing field {key!r} (fields present: {', '.join(sorted(rec.fields))})")
    return rec.fields[key]


# What a value from JSON, CSV or parquet is, as its file calls it.
KINDS = {
    "NoneType": "null",
    "dict": "an object",
    "list": "a list",
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
}


def kind_of(value: Any) -> str:
    """'null', 'an object', 'a list', 'a string', 'an integer', ...: for messages about a value's type."""
    return KINDS.get(type(value).__name__, f"a {type(value).__name__}")


def _str(value: Any, rec: RawRecord, name: str) -> str:
    if not isinstance(value, str):
        raise Skipped(f"{rec.where}: field {name!r} is {kind_of(value)}, expected text")
    return value


def alpaca_prompt(instruction: str, input_text: str | None) -> str:
    """The instruction, then a blank line and "Input: ..." when the input is non-empty."""
    return f"{instruction}\n\nInput: {input_text}" if input_text and input_text.strip() else instruction


def normalise_messages(raw: list[Any], rec: RawRecord, counts: Counter[str]) -> list[dict[str, str]]:
    """Map roles, drop tool and function turns (counted), refuse any other role, merge nothing yet,
    cut to end on an assistant turn."""
    if not isinstance(raw, list):
        raise Skipped(f"{rec.where}: messages must be a list, got {kind_of(raw)}")
    out: list[dict[str, str]] = []
    for number, msg in enumerate(raw, start=1):
        where = f"{rec.where}: message {number}"
        if not isinstance(msg, dict):
            raise Skipped(f"{where} is {kind_of(msg)}, expected an object with role and content")
        role = msg.get("role", msg.get("from"))
        if not isinstance(role, str) or not role.strip():
            raise Skipped(f"{where} has no role (a 'role' or 'from' field: {KNOWN_ROLES})")
        mapped = ROLES.get(role.strip().lower())
        if mapped is None:
            if role.strip().lower() in DROPPED_ROLES:
                counts["unknown_role_messages_dropped"] += 1
                continue
            raise Skipped(f"{where} has role {role!r}; known roles: {KNOWN_ROLES}")
        content = msg.get("content", msg.get("value"))
        if content is None:
            raise Skipped(f"{where} has no content (a 'content' or 'value' field holding text)")
        if not isinstance(content, str):
            raise Skipped(f"{where}: content is {kind_of(content)}, expected text")
        out.append({"role": mapped, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()
        counts["trailing_user_turns_cut"] += 1
    if not any(m["role"] == "assistant" for m in out):
        raise Skipped(f"{rec.where}: conversation has no assistant turn")
    return out


def normalise_record(
    rec: RawRecord, fmt: str, mapping: dict[str, str], label_names: list[str] | None, counts: Counter[str]
) -> dict[str, Any]:
    if fmt == "text":
        return {"text": _str(_get(rec, "text", mapping), rec, "text")}
    if fmt == "classification":
        text = _str(_get(rec, "text", mapping), rec, "text")
        label = _get(rec, "label", mapping)
        if not isinstance(label, str | int | float):  # None, a list, an object
            raise Skipped(f"{rec.where}: label is {kind_of(label)}, expected a label name or index")
        name = str(label).strip()
        if not name:
            raise Skipped(f"{rec.where}: label is empty")
        if not text.strip():
            raise Skipped(f"{rec.where}: text is empty")
        if label_names is not None:
            if name.lstrip("-").isdigit() and name not in label_names:
                index = int(name)
                if not 0 <= index < len(label_names):
                    raise Skipped(f"{rec.where}: label {name} is outside the label set {label_names}")
                name = label_names[index]
            elif name not in label_names:
                raise Skipped(f"{rec.where}: label {name!r} is outside the label set {label_names}")
        return {"text": text.strip(), "label": name}
    if fmt == "alpaca":
        instruction = _str(_get(rec, "instruction", mapping), rec, "instruction")
        extra = _get(rec, "input", mapping, required=False)
        output = _str(_get(rec, "output", mapping), rec, "output")
        messages = [{"role": "user", "content": alpaca_prompt(instruction, extra)}]
        return {"messages": [*messages, {"role": "assistant", "content": output}]}
    if fmt == "prompt_completion":
        prompt = _str(_get(rec, "prompt", mapping), rec, "prompt")
        completion = _str(_get(rec, "completion", mapping), rec, "completion")
        return {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        }
    if fmt in {"sharegpt", "messages"}:
        return {
            "messages": normalise_messages(
                _get(rec, "conversations" if fmt == "sharegpt" else "messages", mapping), rec, counts
            )
        }
    raise DataError(f"unknown data format {fmt!r}")


def normalise(
    records: list[RawRecord],
    fmt: str,
    mapping: dict[str, str],
    label_names: list[str] | None,
    on_error: str,
    counts: Counter[str],
    kept: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Normalised records; bad ones raise one DataError line, or are skipped and counted.

    `kept`, when given, receives the index in `records` of every record that was kept.
    """
    if not records:
        raise DataError("the data set is empty (no records)")
    if fmt == "auto":
        fmt = detect_format(records[0].fields, mapping)
    out = []
    for index, rec in enumerate(records):
        try:
            out.append(normalise_record(rec, fmt, mapping, label_names, counts))
            if kept is not None:
                kept.append(index)
        except Skipped as exc:
            if on_error == "fail":
                raise DataError(f"{exc} (set data.on_error=skip to skip such records)") from None
            counts["skipped_bad_records"] += 1
    if not out:
        raise DataError(f"the data set is empty: all {len(records)} records were skipped as bad")
    return out


def record_kind(record: dict[str, Any]) -> str:
    return "chat" if "messages" in record else "classification" if "label" in record else "text"
