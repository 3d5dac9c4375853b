"""Fuzzing: random and mutated configs, overrides and text never crash; only PeftlabError comes out."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peftlab.config.loading import load_config, parse_overrides, validate_config
from peftlab.config.run import RunConfig
from peftlab.data.text import split_documents
from peftlab.errors import PeftlabError

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VALID: dict[str, Any] = {
    "model": {"name": "smollm2-135m-instruct", "dtype": "float32"},
    "data": {"train_path": "x.txt", "block_size": 64},
    "method": {"name": "lora", "r": 4, "target_modules": ["q_proj"]},
    "train": {"lr": 1e-3, "max_steps": 3},
    "eval": {"window": 32, "stride": 16},
}
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
    max_leaves=8,
)
KEYS = [(section, key) for section, body in VALID.items() for key in body]


def only_clear_errors(action) -> None:  # type: ignore[no-untyped-def]
    try:
        result = action()
    except PeftlabError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
    else:
        assert isinstance(result, RunConfig)


@SETTINGS
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_random_mappings(raw: dict[str, Any]) -> None:
    only_clear_errors(lambda: validate_config(raw))


@SETTINGS
@given(st.sampled_from(KEYS), values)
def test_mutated_valid_configs(key: tuple[str, str], value: Any) -> None:
    section, name = key
    raw = {s: dict(body) for s, body in VALID.items()}
    raw[section][name] = value
    only_clear_errors(lambda: validate_config(raw))


@SETTINGS
@given(st.text(max_size=200))
def test_random_yaml_text(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    only_clear_errors(lambda: load_config(path))


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=4))
def test_random_overrides(items: list[str]) -> None:
    def action() -> RunConfig:
        parse_overrides(items)
        return load_config(None, items, base=VALID)

    only_clear_errors(action)


# Text built from the pieces each mode cuts at (headings, sub-headings, blank lines with spaces, tabs
# and CRs in them), mixed with arbitrary text, so that the cuts really happen.
TEXT_PIECES = st.sampled_from(
    [" = Title = \n", " = = Section = = \n", "\n", "\n\n", " \n\t\n", "\r\n", " ", "word", " = x = "]
)
documents_text = st.one_of(
    st.text(max_size=300), st.lists(TEXT_PIECES | st.text(max_size=8), max_size=40).map("".join)
)


def assert_cut_at_whitespace_only(text: str, docs: list[str]) -> None:
    """The documents lie in `text` in order, without overlap, and what lies around and between them
    is whitespace: no character other than whitespace is dropped."""
    pos = 0
    for doc in docs:
        at = text.find(doc, pos)
        assert at >= 0 and not text[pos:at].strip(), (text, docs)
        pos = at + len(doc)
    assert not text[pos:].strip(), (text, docs)


@SETTINGS
@given(documents_text, st.sampled_from(["file", "blank_lines", "wikitext_headings"]))
def test_document_splitting_never_loses_text(text: str, mode: str) -> None:
    docs = split_documents(text, mode)
    assert all(doc.strip() for doc in docs)
    if not text.strip():
        assert docs == []
        return
    assert docs  # a text with any non-whitespace character gives at least one document
    assert_cut_at_whitespace_only(text, docs)
    if mode == "file":
        assert docs == [text]
    elif mode == "wikitext_headings":  # cuts between lines and drops nothing
        assert "".join(docs) == text
        for doc in docs[1:]:  # every later document starts at an article heading " = Title = "
            line = doc.splitlines(keepends=True)[0].rstrip("\n")
            assert len(line) >= 7 and line[:3] == line[-3:] == " = " and line[3] != "=", (text, docs)
    else:  # blank_lines: cut at blank lines (spaces allowed in them), and only those are dropped
        assert not any(re.search(r"\n\s*\n", doc) for doc in docs), docs
        pos = text.find(docs[0]) + len(docs[0])
        for doc in docs[1:]:  # between two documents lies a blank line
            at = text.find(doc, pos)
            assert re.search(r"\n\s*\n", text[pos:at]), (text, docs)
            pos = at + len(doc)


def test_the_valid_base_config_is_valid() -> None:
    assert validate_config(yaml.safe_load(yaml.safe_dump(VALID))).method.name == "lora"
