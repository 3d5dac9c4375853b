"""What the sweep tests share: a sweep file over the tiny run, and the tiny run as a sweep's base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_sweep(folder: Path, base: dict[str, Any], **sweep: Any) -> Path:
    """folder/sweep.yaml naming `base` and writing its sweep folder to folder/sweeps/s."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": base, "output": str(folder / "sweeps"), "name": "s", **sweep}))
    return path


def sweep_base(tiny_run_config: dict[str, Any]) -> dict[str, Any]:
    """The tiny run without its output section, sample prompts or forgetting text, 4 steps of 2."""
    cfg = dict(tiny_run_config)
    cfg.pop("output")
    cfg["eval"] = {**cfg["eval"], "sample_prompts": [], "forgetting_path": None}
    cfg["train"] = {**cfg["train"], "max_steps": 4, "batch_size": 2}
    return cfg
