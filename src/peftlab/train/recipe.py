"""train(cfg) -> RunResult: the one training path for every method, read top to bottom.

    run = start_run(cfg, ...)           set-up, the method's dry run, data, estimate, run folder
    model = load_base(run)              the base weights, as the method asks (4-bit for QLoRA)
    score_base_model(run, model)        the base model's evaluation (cached per model and inputs)
    model = prepare_model(run, model)   the method freezes, wraps or injects adapters
    trainer = build_trainer(run, model)
    trained = train_model(run, trainer) Trainer.train, within the scoped speed-ups
    score_tuned_model(run, model)       the same evaluation of the tuned model, forgetting, samples
    write_results(run, model, trained)  adapter or model, metrics.json, plots
    (the last three within the trackers of train.report_to, which get the final metrics: trackers.py)

The method supplies whatever differs (methods/registry.py MethodSpec); nothing here tests a
method's name. The run's state travels in one `Run` record; manifest.json and metrics.json are
written through its RunFolder only, metrics.json once, at the end.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from peftlab.config.run import RunConfig
from peftlab.cpu import huge_pages, malloc
from peftlab.evaluation.base_cache import score_base
from peftlab.evaluation.inputs import EvalInputs, build_eval_inputs
from peftlab.evaluation.runner import evaluate_model, plot_confusions, record_comparison
from peftlab.methods import MethodSpec, get_method
from peftlab.model.fingerprint import model_fingerprint
from peftlab.model.loading import (
    build_on_meta,
    load_model,
)
from peftlab.model.structure import ParamCounts, count_parameters, write_task_labels
from peftlab.run_setup import RunSetup, set_up
from peftlab.runs import (
    RunFolder,
    atomic_write_json,
    atomic_write_text,
    base_manifest,
    check_output_dir,
    create_run_dir,
    now_iso,
)
from peftlab.sizing.plan import Plan, must_release_memory, preflight
from peftlab.sizing.resources import ResourceMonitor, gib, parameter_bytes
from peftlab.train import trackers
from peftlab.train.arguments import training_arguments
from peftlab.train.callbacks import (
    CheckpointMarker,
    GracefulInterrupt,
    JsonlLogger,
    KeepNewestAndBest,
    LossProgressBar,
    MemorySplit,
    PaddingTally,
    read_log,
)
from peftlab.train.checkpoints import checkpoint_step, checkpoint_to_resume, trim_log, validation_summary
from peftlab.train.speedups import Speedups, training_speedups
from peftlab.train.trainer import PeftlabTrainer, choose_loss


@dataclass
class RunResult:
    run_dir: Path
    status: str
    metrics: dict[str, Any]


@dataclass
class Run:
    """One run's state, from set-up to results."""

    cfg: RunConfig
    spec: MethodSpec
    setup: RunSetup
    folder: RunFolder
    eval_inputs: EvalInputs | None
    estimate: Plan | None
    checkpoint: Path | None  # the checkpoint a resumed run continues from
    progress: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    framework_rss: int = 0  # process RSS before the model was loaded: the libraries' own
    counts: ParamCounts | None = None


@dataclass
class Trained:
    """What training measured."""

    output: Any  # transformers' TrainOutput
    seconds: float
    monitor: ResourceMonitor
    split: MemorySplit
    tally: PaddingTally
    padding_measured: bool
    speedups: Speedups


def train(
    cfg: RunConfig, progress: bool = True, resume_dir: Path | None = None, force: bool = False
) -> RunResult:
    """Train as `cfg` says; with `resume_dir`, continue that run from its newest complete checkpoint.

    Before the model is loaded, the memory estimate is printed; a run that will not fit is refused
    unless `force`."""
    run = start_run(cfg, progress, resume_dir, force)
    try:
        model = load_base(run)
        score_base_model(run, model)
        model = prepare_model(run, model)
        trainer = build_trainer(run, model)
        with trackers.reporting(cfg, run.folder.path, trainer) as report:  # train.report_to
            trained = train_model(run, trainer)
            score_tuned_model(run, model)
            write_results(run, model, trainer, trained)
            report(run.metrics)
    except BaseException as exc:
        mark_stopped(run.folder, exc)
        raise
    run.folder.update_manifest(status="completed", finished_at=now_iso())
    return RunResult(run.folder.path, "completed", run.metrics)


def start_run(cfg: RunConfig, progress: bool, resume_dir: Path | None, force: bool) -> Run:
    """Everything that can fail on bad input, before a run folder exists; then the folder."""
    checkpoint = checkpoint_to_resume(resume_dir) if resume_dir is not None else None
    trackers.check_installed(cfg.train.report_to)
    if resume_dir is None:
        check_output_dir(cfg.output.dir)  # a bad output folder fails before any work
    spec = get_method(cfg.method.name)
    set_seed(cfg.train.seed)
    setup = set_up(cfg, spec)  # lengths and data first: bad input fails before a run folder exists
    eval_inputs = build_eval_inputs(cfg, setup.tokenizer, setup.task) if cfg.eval.enabled else None
    # The estimate's meta model is the method's dry run (bad targets fail before weights load); a
    # resumed run is not estimated again, so it runs the dry run alone. On the CPU the estimate's
    # overhead is this process's RSS, which now holds the tokenizer and data the run holds too.
    estimate = None
    if checkpoint is None:
        estimate = preflight(cfg, setup.model_config, setup.dtype, force)
    else:
        spec.prepare(build_on_meta(setup.source, cfg.model), cfg.method)
    if setup.device.type == "cpu" and must_release_memory(cfg.train.release_memory, estimate):
        malloc.tame_glibc_malloc()  # peak RSS close to live memory; for the rest of the process
    if resume_dir is not None and checkpoint is not None:
        folder = reopen_run_folder(resume_dir, checkpoint)
    else:
        folder = new_run_folder(cfg, setup, eval_inputs)
    return Run(cfg, spec, setup, folder, eval_inputs, estimate, checkpoint, progress)


def new_run_folder(cfg: RunConfig, setup: RunSetup, eval_inputs: EvalInputs | None) -> RunFolder:
    name = cfg.output.name or f"{cfg.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = create_run_dir(cfg.output.dir, name)
    atomic_write_text(path / "config.yaml", cfg.to_yaml())
    folder = RunFolder(path, base_manifest(cfg.train.seed))
    folder.update_manifest(
        run_dir=str(path),
        method=cfg.method.name,
        device=str(setup.device),
        dtype=str(setup.dtype).removeprefix("torch."),
        model={
            "name": cfg.model.name,
            "source": setup.source.description,
            "fingerprint": model_fingerprint(setup.source, cfg.model.revision),
        },
        data={
            "train_path": cfg.data.train_path,
            **setup.task.stats,
            "eval_path": cfg.data.eval_path,
            "eval_tokens": len(eval_inputs.lm.ids) if eval_inputs and eval_inputs.lm else 0,
        },
        process=process_settings(),
    )
    print(f"run folder: {path}")
    return folder


def reopen_run_folder(path: Path, checkpoint: Path) -> RunFolder:
    folder = RunFolder.reopen(path)
    resumed = [*folder.manifest.get("resumed", []), {"from": checkpoint.name, "at": now_iso()}]
    trim_log(path / "log.jsonl", checkpoint_step(checkpoint))
    folder.update_manifest(
        status="running",
        finished_at=None,
        error=None,
        traceback=None,
        resumed=resumed,
        process=process_settings(),
    )
    print(f"resuming {path} from {checkpoint.name}")
    return folder


def process_settings() -> dict[str, Any]:
    """Process-wide settings a run trains under, as they are (not as asked): set by this run, an
    earlier run in the same process, or the environment."""
    return {"malloc_thresholds_fixed": malloc.memory_released(), "huge_pages": huge_pages.in_effect()}


def load_base(run: Run) -> Any:
    run.framework_rss = psutil.Process().memory_info().rss
    s = run.setup
    model = load_model(s.source, run.cfg.model, s.device, s.dtype, s.load_options)
    # Real bytes of the loaded base weights (after quantisation, for 4-bit bases).
    run.metrics.update(method=run.cfg.method.name, base_weights_bytes=model.get_memory_footprint())
    return model


def score_base_model(run: Run, model: Any) -> None:
    if run.eval_inputs is None:
        return
    saved = run.folder.path / "base_metrics.json"
    if run.checkpoint is not None and saved.is_file():
        run.metrics["base"] = json.loads(saved.read_text())  # measured before the interruption
        return
    run.metrics["base"], run.metrics["base_eval_cached"] = score_base(
        model, run.cfg, run.setup, run.eval_inputs, run.progress
    )
    atomic_write_json(saved, run.metrics["base"])


def prepare_model(run: Run, model: Any) -> Any:
    task = run.setup.task
    # label names (and the batches' pad id) where a head method reads them; causal LMs ignore them
    write_task_labels(model, task.label_names, getattr(task.collator, "pad_id", None))
    model = run.spec.prepare(model, run.cfg.method)
    run.counts = count_parameters(model)
    print(run.counts.line())
    if run.cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # so checkpointed blocks see a grad path with a frozen base
    return model


def build_trainer(run: Run, model: Any) -> PeftlabTrainer:
    cfg, setup, task = run.cfg, run.setup, run.setup.task
    run.metrics["loss_impl"] = choose_loss(cfg.train.loss, model, task, setup.device)
    has_validation = task.validation_dataset is not None
    args = training_arguments(
        cfg, run.spec, run.folder.path, setup.device, setup.dtype, run.progress, has_validation
    )
    trainer = PeftlabTrainer(
        model=model,
        args=args,
        train_dataset=task.train_dataset,
        eval_dataset=task.validation_dataset,
        data_collator=task.collator,
        processing_class=setup.tokenizer,
        optimizers=(run.spec.make_optimizer(model, cfg.method, cfg.train), None),
        callbacks=[
            JsonlLogger(run.folder.path / "log.jsonl"),
            MemorySplit(),
            PaddingTally(run.checkpoint),  # exact padding of the batches trained on (before the marker)
            CheckpointMarker(),
            KeepNewestAndBest(cfg.train.save_total_limit),
            GracefulInterrupt(),
        ],
        chunked_loss=run.metrics["loss_impl"] == "chunked",
    )
    # The stock bar prints every log dict; without a bar transformers prints them instead.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if run.progress:
        trainer.add_callback(LossProgressBar())
    return trainer


def train_model(run: Run, trainer: PeftlabTrainer) -> Trained:
    split, tally, interrupt = (
        _callback(trainer, kind) for kind in (MemorySplit, PaddingTally, GracefulInterrupt)
    )
    malloc.return_freed_heap()  # what loading and the base evaluation freed (cpu/malloc.py)
    setup, resume = run.setup, str(run.checkpoint) if run.checkpoint else None
    model: Any = trainer.model
    with (
        tally.attached(model, setup.task.collator) as padding_measured,
        interrupt.installed(),
        training_speedups(run.cfg.train, model, setup.device, setup.dtype) as speedups,
        ResourceMonitor() as monitor,
    ):
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
    speedups.settle()
    if interrupt.requested:
        step = trainer.state.global_step
        print(f"interrupted at step {step}; resume with: peftlab train --resume {run.folder.path}")
        raise KeyboardInterrupt
    return Trained(output, seconds, monitor, split, tally, padding_measured, speedups)


def score_tuned_model(run: Run, model: Any) -> None:
    if run.eval_inputs is None:
        return
    run.metrics["tuned"] = evaluate_model(
        model, run.setup.tokenizer, run.cfg, run.eval_inputs, "tuned", run.progress
    )
    run.metrics["forgetting"] = record_comparison(
        run.folder.path, run.metrics["base"], run.metrics["tuned"], run.eval_inputs
    )


def write_results(run: Run, model: Any, trainer: PeftlabTrainer, trained: Trained) -> None:
    path, cfg = run.folder.path, run.cfg
    artefact = path / run.spec.artifact
    model.save_pretrained(artefact, safe_serialization=True)
    run.setup.tokenizer.save_pretrained(artefact)
    run.metrics.update(training_metrics(run, trainer, trained), artefact=run.spec.artifact)
    run.folder.write_metrics(run.metrics)
    if run.eval_inputs is not None:
        plot_confusions(path / "plots", {"base": run.metrics["base"], "tuned": run.metrics["tuned"]})
    log = read_log(path / "log.jsonl")
    if log:
        from peftlab.reports.plots import plot_loss  # matplotlib costs ~35 MB RSS: load it after training

        plot_loss(
            log, path / "plots" / "loss.png", title=f"{cfg.method.name} on {Path(cfg.data.train_path).name}"
        )
    tokens_per_second = run.metrics["tokens_per_second"] or 0
    print(
        f"train: {trained.seconds:.1f} s, {tokens_per_second:.0f} real tokens/s, peak RSS {gib(trained.monitor.peak_rss)}"
    )


def training_metrics(run: Run, trainer: PeftlabTrainer, trained: Trained) -> dict[str, Any]:
    """metrics.json's training part: parameters, steps, losses, speed, memory, what was in effect."""
    state, counts = trainer.state, run.counts
    assert counts is not None  # set by prepare_model
    since = checkpoint_step(run.checkpoint) if run.checkpoint else 0
    validation = validation_summary(state, run.folder.path, since)
    losses = [r["loss"] for r in read_log(run.folder.path / "log.jsonl")]
    step_seconds = trained.seconds - validation["eval_seconds"]  # speed leaves validation out
    tokens = state.num_input_tokens_seen
    padding = (
        trained.tally.as_dict()
        if trained.padding_measured
        else {"padding_waste": run.setup.task.stats["padding_waste"]}
    )
    estimate = run.estimate
    return {
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_percent": counts.percent,
        "train_steps": state.global_step,
        "train_loss": trained.output.training_loss,
        "first_logged_loss": losses[0] if losses else None,
        "final_logged_loss": losses[-1] if losses else None,
        "train_seconds": trained.seconds,
        "seconds_per_epoch": trained.seconds / max(state.epoch or 1.0, 1e-9),
        "real_tokens_trained": tokens,
        "tokens_per_second": tokens / step_seconds if step_seconds > 0 else None,
        **validation,
        "padding": padding,
        "padding_waste": padding["padding_waste"],
        "memory": trained.monitor.as_dict(),
        "memory_split": memory_split(trainer.model, trained.split, trained.monitor, run.framework_rss),
        "speedups": trained.speedups.state,
        **trained.speedups.counts,
        # what the process ran under, not what was asked: an earlier run may have fixed it
        "release_memory": malloc.memory_released(),
        "estimate": {**estimate.memory.as_dict(), "capacity": estimate.capacity} if estimate else None,
    }


def memory_split(model: Any, split: MemorySplit, monitor: ResourceMonitor, framework: int) -> dict[str, int]:
    """Peak memory in parts: parameter, gradient and optimizer bytes exactly; activations (and
    everything else alive at the peak: the loss working set, gradients then alive) as the rest.
    On CUDA the peak is the allocator's; on the CPU it is the process RSS, of which `framework`
    (RSS before the model was loaded) is the libraries' own."""
    cuda = monitor.cuda_peak_allocated is not None
    peak = int((monitor.cuda_peak_allocated if cuda else monitor.peak_rss) or 0)
    overhead = 0 if cuda else framework
    parts = {
        "weights_bytes": parameter_bytes(model),
        "trainable_bytes": parameter_bytes(model, trainable_only=True),
        "gradient_bytes": split.gradient_bytes,
        "optimizer_state_bytes": split.optimizer_state_bytes,
        "framework_bytes": overhead,
    }
    known = parts["weights_bytes"] + parts["optimizer_state_bytes"] + overhead
    return {**parts, "activations_and_rest_bytes": max(peak - known, 0), "peak_bytes": peak}


def mark_stopped(folder: RunFolder, exc: BaseException) -> None:
    """manifest.json says how the run ended when it did not complete: interrupted or failed."""
    folder.update_manifest(
        status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
        finished_at=now_iso(),
        error=f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__,
        traceback=traceback.format_exception(exc)[-3:],
    )


def _callback(trainer: PeftlabTrainer, kind: type) -> Any:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, kind))
