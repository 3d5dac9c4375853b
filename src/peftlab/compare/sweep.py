"""Sweep files: a base run config plus axes, expanded into the runs of a comparison.

```
# peftlab compare configs/sweeps/lora-rank.yaml
base: ../wikitext-lora.yaml          # a run config file (relative to this file), or a mapping
overrides: [eval.sample_prompts=[]]  # key.sub=value changes to the base (the command line's follow)
name: lora-rank                      # the sweep folder's name (default: this file's stem)
output: runs/sweeps                  # where the sweep folder goes
budget_tokens: 65536                 # training tokens of every run (default: the base config's)
axes:
  method.name: [lora, dora]          # full product over axes
  [method.r, method.alpha]: [[4, 8], [8, 16]]   # paired: these keys move together
seeds: [0, 1]
```

Every point is a resolved, validated RunConfig with a stable key (a hash of it), so a sweep run
again finds its finished points. Equal budgets: each point trains on `budget_tokens` tokens, so
points with different batch shapes take different step counts (`train.max_steps` is derived; an
axis may not set it).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from peftlab.config.loading import UniqueKeyLoader, deep_merge, parse_overrides, read_yaml, validate_config
from peftlab.config.run import RunConfig
from peftlab.errors import ConfigError

SEED_KEY = "train.seed"
DERIVED_KEYS = {"train.max_steps", "train.epochs", "data.max_train_tokens", "output.dir", "output.name"}


class SweepFile(BaseModel):
    """The sweep file's own keys (unknown keys are errors, as in run configs)."""

    model_config = ConfigDict(extra="forbid")

    base: str | dict[str, Any] = Field(
        ..., description="A run config file (relative to the sweep file) or a mapping."
    )
    overrides: list[str] = Field(
        default_factory=list, description="key.sub=value changes to the base config."
    )
    name: str | None = Field(None, description="Sweep folder name; default: the sweep file's stem.")
    output: str = Field("runs/sweeps", description="Folder that holds sweep folders.")
    budget_tokens: int | None = Field(
        None,
        ge=1,
        description="Training tokens per run, equal for all; default: the base config's max_steps x tokens per step.",
    )
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted key (or 'k1,k2' paired) -> values."
    )
    seeds: list[int] = Field(
        default_factory=lambda: [0], description="train.seed values; every cell runs each."
    )

    @field_validator("seeds")
    @classmethod
    def _some_seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return seeds


@dataclass(frozen=True)
class Axis:
    keys: tuple[str, ...]  # one key, or paired keys that move together
    values: tuple[tuple[Any, ...], ...]  # one tuple of values (one per key) per setting


@dataclass(frozen=True)
class Point:
    """One run of the sweep: its settings on the axes, its seed, and its resolved config."""

    name: str  # run folder name: readable settings + the key
    key: str  # hash of the resolved config (without output and trackers): stable across reruns
    settings: dict[str, Any]  # axis key -> value (seed included as train.seed)
    config: RunConfig

    @property
    def cell(self) -> tuple[tuple[str, str], ...]:
        """The settings other than the seed: runs that differ only by seed share a cell."""
        return tuple((k, json.dumps(v)) for k, v in self.settings.items() if k != SEED_KEY)


@dataclass(frozen=True)
class Sweep:
    name: str
    folder: Path
    budget_tokens: int
    axes: tuple[Axis, ...]
    points: tuple[Point, ...]


class _SweepLoader(UniqueKeyLoader):
    """The config loader (duplicate keys refused), where a flow-sequence key
    (`[method.r, method.alpha]: ...`, a paired axis) reads as the comma-joined string "method.r,method.alpha"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        for i, (key_node, value_node) in enumerate(node.value):
            if isinstance(key_node, yaml.SequenceNode):
                joined = ",".join(str(self.construct_object(k)) for k in key_node.value)
                key = yaml.ScalarNode("tag:yaml.org,2002:str", joined, key_node.start_mark, key_node.end_mark)
                node.value[i] = (key, value_node)
        return super().construct_mapping(node, deep=deep)


def read_sweep_file(path: Path) -> dict[str, Any]:
    return read_yaml(path, loader=_SweepLoader, kind="sweep", holds="a mapping with base, axes and seeds")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read, validate and expand a sweep file; `overrides` (key.sub=value) apply to the base config.
    Every error is one line and comes before anything trains."""
    path = Path(path)
    raw = read_sweep_file(path)
    try:
        spec = SweepFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(where, list(SweepFile.model_fields), n=1)
            hint = (
                f" (did you mean '{close[0]}'?)"
                if close
                else f" (valid: {', '.join(SweepFile.model_fields)})"
            )
            raise ConfigError(f"{path}: unknown sweep key '{where}'{hint}") from None
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None
    base = read_yaml(path.parent / spec.base) if isinstance(spec.base, str) else dict(spec.base)
    base = deep_merge(base, parse_overrides([*spec.overrides, *(overrides or [])]))
    base_cfg = validate_config(base)
    axes = _axes(spec.axes, path)
    budget = spec.budget_tokens or _budget_of(base_cfg, path)
    name = spec.name or path.stem
    folder = Path(spec.output) / name
    points = tuple(_points(base, axes, spec.seeds, budget, folder))
    return Sweep(name, folder, budget, axes, points)


def _axes(raw: dict[str, list[Any]], path: Path) -> tuple[Axis, ...]:
    axes, seen = [], set[str]()
    for joined, values in raw.items():
        keys = tuple(k.strip() for k in joined.split(","))
        if not values:
            raise ConfigError(f"{path}: axis '{joined}' has no values")
        for key in keys:
            if key in seen:
                raise ConfigError(f"{path}: two axes set '{key}'")
            if key in DERIVED_KEYS or key == SEED_KEY:
                why = (
                    "the seeds list sets it"
                    if key == SEED_KEY
                    else "the sweep sets it (equal token budgets, run folders)"
                )
                raise ConfigError(f"{path}: axis '{key}' cannot be swept: {why}")
            seen.add(key)
        rows = []
        for value in values:
            row = tuple(value) if len(keys) > 1 else (value,)
            if len(keys) > 1 and (not isinstance(value, list) or len(value) != len(keys)):
                raise ConfigError(
                    f"{path}: paired axis '{joined}' needs lists of {len(keys)} values, got {value!r}"
                )
            rows.append(row)
        axes.append(Axis(keys, tuple(rows)))
    return tuple(axes)


def tokens_per_step(cfg: RunConfig) -> int:
    """Token positions one optimizer step trains on: rows x accumulation x tokens per row."""
    return cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.seq_len


def _budget_of(cfg: RunConfig, path: Path) -> int:
    if cfg.train.max_steps is None:
        raise ConfigError(
            f"{path}: set budget_tokens, or train.max_steps in the base config (the budget is derived from it)"
        )
    return cfg.train.max_steps * tokens_per_step(cfg)


def _points(
    base: dict[str, Any], axes: tuple[Axis, ...], seeds: list[int], budget: int, folder: Path
) -> list[Point]:
    points = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        settings: dict[str, Any] = {}
        for axis, values in zip(axes, combo, strict=True):
            settings.update(zip(axis.keys, values, strict=True))
        for seed in seeds:
            chosen = {**settings, SEED_KEY: seed}
            points.append(_point(base, chosen, budget, folder))
    return points


def _point(base: dict[str, Any], settings: dict[str, Any], budget: int, folder: Path) -> Point:
    raw = base
    for key, value in settings.items():
        raw = _set(raw, key, value)
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    try:
        cfg = validate_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"sweep point ({described}): {exc}") from None
    per_step = tokens_per_step(cfg)
    if budget % per_step:
        raise ConfigError(
            f"sweep point ({described}): budget_tokens={budget} is not a whole number of steps of "
            f"{per_step} tokens (batch_size x grad_accum_steps x {cfg.seq_len_key}); choose a multiple"
        )
    resolved = cfg.model_dump(mode="json")
    resolved["train"]["max_steps"] = budget // per_step
    resolved.pop("output")
    # where a run reports is no part of what it trains: the key leaves the trackers out
    trackers = {k: resolved["train"].pop(k) for k in ("report_to", "tracker_group")}
    key = hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:10]
    name = f"{_slug(settings)}-{key}"
    resolved["output"] = {"dir": str(folder / "runs"), "name": name}
    # trackers group a sweep's runs under its name (a W&B group, an MLflow experiment)
    resolved["train"].update(trackers, tracker_group=trackers["tracker_group"] or folder.name)
    return Point(name, key, dict(settings), validate_config(resolved))


def _set(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of `tree` with `dotted` set to `value`: replaced, not merged, so an axis over whole
    sections (`method: [{name: full}, {name: lora, r: 8}]`) leaves nothing of the base's section."""
    head, _, rest = dotted.partition(".")
    copy = dict(tree)
    if not rest:
        copy[head] = value
        return copy
    child = copy.get(head)
    copy[head] = _set(child if isinstance(child, dict) else {}, rest, value)
    return copy


def show(value: Any) -> str:
    """A setting in a table: a whole section (method: {...}) as its name and short settings."""
    if isinstance(value, dict):
        return " ".join(
            f"{k}={v}" if k != "name" else str(v) for k, v in value.items() if not isinstance(v, list | dict)
        )
    return value if isinstance(value, str) else json.dumps(value)


def _slug(settings: dict[str, Any]) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}{show(value).replace(' ', '-')}" for key, value in settings.items()]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "", "_".join(parts))[:80] or "run"


def dry_run_table(sweep: Sweep) -> str:
    """The expanded points as an aligned table (peftlab compare --dry-run)."""
    keys = [k for axis in sweep.axes for k in axis.keys] + [SEED_KEY]
    header = ["#", *keys, "max_steps", "tokens", "run folder"]
    rows = [
        [
            str(i + 1),
            *(
                json.dumps(p.settings[k]) if not isinstance(p.settings[k], str) else p.settings[k]
                for k in keys
            ),
            str(p.config.train.max_steps),
            f"{(p.config.train.max_steps or 0) * tokens_per_step(p.config):,d}",
            p.name,
        ]
        for i, p in enumerate(sweep.points)
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    head = f"sweep {sweep.name}: {len(sweep.points)} runs, {sweep.budget_tokens:,d} training tokens each -> {sweep.folder}"
    return "\n".join([head, *lines])
