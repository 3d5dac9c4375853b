"""The base model's evaluation, computed once per (model, evaluation inputs, settings) and reused:
$PEFTLAB_CACHE/evals/<key>.json, key = hash(model identity, inputs, evaluation settings). A sweep
that trains many methods on one base scores that base once.

The model's identity is its content (model/fingerprint.py): a folder whose weights were rewritten in
place is a new model. A hub model whose revision cannot be resolved to a commit offline is not
cached: what that name points to can move."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from peftlab.cache import cache_dir
from peftlab.config.run import RunConfig
from peftlab.config.sections import EvalConfig
from peftlab.evaluation.inputs import EvalInputs
from peftlab.evaluation.runner import evaluate_model
from peftlab.model.fingerprint import is_pinned, model_fingerprint
from peftlab.run_setup import RunSetup
from peftlab.runs import atomic_write_json, now_iso

# bump when a metric's definition or the key changes, so old cached base results are not reused
# (2: the model's identity is a hash of its content, no longer its files' names and sizes)
CACHE_VERSION = 2


def model_identity(
    fingerprint: str, cfg: RunConfig, device: torch.device, dtype: torch.dtype, load_options: dict[str, Any]
) -> dict[str, Any]:
    """What makes two base models score alike: weights, revision, device type, dtype, and the load
    options a method asks for (a 4-bit base scores differently from a full-precision one)."""

    def plain(value: Any) -> Any:
        return value.to_dict() if hasattr(value, "to_dict") else str(value)

    return {
        "name": cfg.model.name,
        "fingerprint": fingerprint,
        "revision": cfg.model.revision,
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "load_options": json.loads(json.dumps(load_options, sort_keys=True, default=plain)),
    }


def base_cache_path(identity: dict[str, Any], cfg: EvalConfig, inputs: EvalInputs) -> Path:
    settings = cfg.model_dump(mode="json", exclude={"cache", "enabled"})
    key = json.dumps(
        {"version": CACHE_VERSION, "model": identity, "eval": settings, "inputs": inputs.fingerprint()},
        sort_keys=True,
    )
    return cache_dir() / "evals" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def evaluate_base(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    inputs: EvalInputs,
    identity: dict[str, Any],
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """The base model's evaluation, from the cache when the same model was scored on the same inputs
    with the same settings; returns (result, cache hit)."""
    fingerprint = str(identity.get("fingerprint", ""))
    path = base_cache_path(identity, cfg.eval, inputs) if cfg.eval.cache else None
    if path is not None and not is_pinned(fingerprint):
        print(
            f"base evaluation: not cached, the model's identity {fingerprint} can move (its revision "
            "is not resolved to a commit in the local hub cache); pin model.revision to a commit"
        )
        path = None
    if path is not None and path.is_file():
        try:
            result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))["result"]
            print(f"base evaluation: reusing cached result {path} (same model, eval inputs and settings)")
            return result, True
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            pass  # a damaged cache entry is recomputed and rewritten
    result = evaluate_model(model, tokenizer, cfg, inputs, "base", progress)
    if path is not None:
        atomic_write_json(path, {"created": now_iso(), "model": identity, "result": result})
        print(f"base evaluation cached: {path}")
    return result, False


def score_base(
    model: Any, cfg: RunConfig, setup: RunSetup, inputs: EvalInputs, progress: bool = True
) -> tuple[dict[str, Any], bool]:
    """`evaluate_base` for the model `setup` loaded; returns (result, cache hit)."""
    identity = model_identity(
        model_fingerprint(setup.source, cfg.model.revision),
        cfg,
        setup.device,
        setup.dtype,
        setup.load_options,
    )
    return evaluate_base(model, setup.tokenizer, cfg, inputs, identity, progress)
