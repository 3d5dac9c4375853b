"""Reading a run config: a YAML file plus `key.sub=value` overrides -> a validated RunConfig, with
one-line errors that name the nearest valid key (the sections are in sections.py, the whole run in run.py)."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from peftlab.config.run import RunConfig
from peftlab.errors import ConfigError
from peftlab.methods import get_method

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['method.r=16', 'train.lr=1e-4'] into a nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw_value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError:
            value = raw_value
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads '1e-4' (no dot) as a string
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} sets a key inside {part!r}, which is not a section")
            node = child
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last and
    drops the first without a word). Keys a merge (`<<: *base`) brings in may still be overridden."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = first_line.get(key)
            except TypeError:  # an unhashable key: SafeLoader names it below
                continue
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (first on line {line}); keep one",
                    key_node.start_mark,
                )
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(
    path: str | Path,
    loader: type[UniqueKeyLoader] = UniqueKeyLoader,
    kind: str = "config",
    holds: str = "a mapping of sections (model, data, method, ...)",
) -> dict[str, Any]:
    """A YAML file that must hold a mapping; every problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold {holds}")
    return loaded


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Load a RunConfig from YAML (or `base`) plus `key.sub=value` overrides; errors are one line."""
    raw = dict(base or {})
    if path is not None:
        raw = deep_merge(raw, read_yaml(path))
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)


def validate_config(raw: dict[str, Any]) -> RunConfig:
    _check_unknown_keys(raw, RunConfig, "")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_first_error_line(exc)) from None


def _section_class(cls: type[BaseModel], key: str, value: Any) -> type[BaseModel] | None:
    if cls is RunConfig and key == "method":
        if isinstance(value, dict) and "name" in value:
            return get_method(str(value["name"])).config_cls
        return None
    annotation = cls.model_fields[key].annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _check_unknown_keys(raw: Any, cls: type[BaseModel], prefix: str) -> None:
    if not isinstance(raw, dict):
        return
    valid = list(cls.model_fields)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in cls.model_fields:
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
            close = close or [v for v in valid if str(key).startswith(v) or v.startswith(str(key))][:1]
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        sub = _section_class(cls, key, value)
        if sub is not None:
            _check_unknown_keys(value, sub, f"{dotted}.")


def _first_error_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        line = f"missing required config key '{loc}'"
    else:
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        line = f"{loc}: {msg}{shown}" if loc else msg
    return line.replace("\n", "\\n")  # one line, whatever the user's keys and values hold
