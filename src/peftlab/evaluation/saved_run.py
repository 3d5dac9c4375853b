"""`peftlab eval`: re-evaluate a finished run from its folder, or evaluate a base model alone.

Both load what training loads (same config, same data split, same evaluation inputs) and score with
evaluation/runner.py, so a re-evaluated run reproduces the tuned metrics of its metrics.json. Weights
load from safetensors only: the run's adapter/ (peft) over the base (over the method's head model
when its spec has one), or its model/ folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.config.loading import load_config
from peftlab.config.run import RunConfig
from peftlab.errors import PeftlabError
from peftlab.evaluation.base_cache import score_base
from peftlab.evaluation.inputs import build_eval_inputs
from peftlab.evaluation.runner import compare_sides, evaluate_model
from peftlab.methods import get_method
from peftlab.model.loading import ModelSource, load_model
from peftlab.model.structure import write_task_labels
from peftlab.run_setup import set_up
from peftlab.runs import atomic_write_json, load_run, now_iso


def _check_artefact(folder: Path, adapter: bool) -> None:
    needed = ["adapter_config.json", "adapter_model.safetensors"] if adapter else ["config.json"]
    missing = [name for name in needed if not (folder / name).is_file()]
    if not adapter and not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PeftlabError(
            f"{folder} is missing {', '.join(missing)}; the run's trained weights are incomplete "
            "(peftlab loads safetensors only)"
        )


def run_config(run_dir: Path, overrides: list[str] | None = None) -> RunConfig:
    """The run's own config (a completed run only); overrides may change eval.* keys only."""
    if not (run_dir / "config.yaml").is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run folder (no config.yaml)")
    manifest = load_run(run_dir, allow_unfinished=True)["manifest"]
    if manifest.get("status") != "completed":
        why = f" ({manifest['error']})" if manifest.get("error") else ""
        raise PeftlabError(
            f"run {run_dir} is {manifest.get('status')}{why}; only a completed run can be evaluated"
        )
    bad = [o for o in overrides or [] if not o.startswith("eval.")]
    if bad:
        raise PeftlabError(f"peftlab eval RUN_DIR takes eval.* overrides only (got {bad[0]!r})")
    return load_config(run_dir / "config.yaml", overrides)


def evaluate_run(
    run_dir: str | Path, overrides: list[str] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Base (cached when possible) and tuned evaluation of a finished run; writes eval.json there."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    spec = get_method(cfg.method.name)
    artefact = run_dir / spec.artifact
    _check_artefact(artefact, spec.saves_adapter)
    setup = set_up(cfg, spec)
    inputs = build_eval_inputs(cfg, setup.tokenizer, setup.task)

    model: Any = load_model(setup.source, cfg.model, setup.device, setup.dtype, setup.load_options)
    base, cached = score_base(model, cfg, setup, inputs, progress)
    if spec.build_head is not None:  # the head model the adapter (with its trained head) sits on
        write_task_labels(model, setup.task.label_names, getattr(setup.task.collator, "pad_id", None))
        model = spec.build_head(model, cfg.method)
    if spec.saves_adapter:
        model = spec.attach_trained(model, artefact)
    else:
        del model
        tuned_source = ModelSource(str(artefact), f"trained model {artefact}")
        model = load_model(tuned_source, cfg.model, setup.device, setup.dtype, setup.load_options)
    tuned = evaluate_model(model, setup.tokenizer, cfg, inputs, "tuned", progress)
    forgetting, samples = compare_sides(base, tuned, inputs)
    result = {
        "run_dir": str(run_dir),
        "evaluated_at": now_iso(),
        "weights": str(artefact.relative_to(run_dir)),
        "base_eval_cached": cached,
        "base": base,
        "tuned": tuned,
        "forgetting": forgetting,
        "samples": samples,
    }
    atomic_write_json(run_dir / "eval.json", result)
    return result


def evaluate_base_model(cfg: RunConfig, progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """The base model alone (as cfg.model loads it, no method load options) on cfg's evaluation."""
    setup = set_up(cfg, spec=None)
    inputs = build_eval_inputs(cfg, setup.tokenizer, setup.task)
    model = load_model(setup.source, cfg.model, setup.device, setup.dtype)
    base, cached = score_base(model, cfg, setup, inputs, progress)
    answers = base.pop("sample_answers", [])
    result = {
        "model": cfg.model.name,
        "source": setup.source.description,
        "evaluated_at": now_iso(),
        "base_eval_cached": cached,
        "base": base,
        "forgetting": {"skipped": "a base model alone has nothing to compare with"},
        "samples": [{"prompt": p, "base": a} for p, a in zip(inputs.sample_prompts, answers, strict=False)],
    }
    if out is not None:
        atomic_write_json(out, result)
    return result
