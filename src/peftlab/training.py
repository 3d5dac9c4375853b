"""train(cfg) -> RunResult: the one training path for every method.

Read top to bottom: seed -> resolve model -> data -> run folder -> load -> base eval -> method
prepares the model -> Trainer -> tuned eval -> save -> metrics. The method supplies preparation,
load options and (if it needs one) the optimizer; nothing here tests a method's name.
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from peftlab.allocator import heap_trimmed_every, return_freed_heap, tame_glibc_malloc
from peftlab.callbacks import JsonlLogger, LossProgressBar, MemorySplit, read_log
from peftlab.causal_blocks import causal_attention_in_blocks
from peftlab.config import RunConfig
from peftlab.cpu_matmul import frozen_linears_on_onednn
from peftlab.data.task import TaskData, build_task_data
from peftlab.estimate import seq_len_key, seq_len_of
from peftlab.evaluation.runner import (
    EvalInputs,
    build_eval_inputs,
    evaluate_base,
    evaluate_model,
    model_identity,
    plot_confusions,
    record_comparison,
)
from peftlab.fit import must_release_memory, preflight
from peftlab.heads import write_task_labels
from peftlab.lean_mlp import lean_gated_mlps
from peftlab.methods import MethodSpec, get_method
from peftlab.models import (
    ModelSource,
    build_on_meta,
    check_lengths,
    decoder_layers,
    load_model,
    load_tokenizer,
    model_fingerprint,
    pick_device,
    pick_dtype,
    read_model_config,
    resolve_source,
)
from peftlab.padding import PaddingTally
from peftlab.params import count_parameters
from peftlab.recompute import norms_recomputed
from peftlab.resources import ResourceMonitor, gib, parameter_bytes
from peftlab.resume import (
    CheckpointMarker,
    GracefulInterrupt,
    checkpoint_step,
    checkpoint_to_resume,
    trim_log,
)
from peftlab.runs import atomic_write_json, atomic_write_text, base_manifest, create_run_dir, now_iso
from peftlab.trainer import PeftlabTrainer, choose_loss
from peftlab.validation import KeepNewestAndBest, evaluation_arguments, validation_summary


@dataclass
class RunResult:
    run_dir: Path
    status: str
    metrics: dict[str, Any]


def default_run_name(cfg: RunConfig) -> str:
    return cfg.output.name or f"{cfg.method.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def training_arguments(
    cfg: RunConfig,
    spec: MethodSpec,
    run_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
    has_validation: bool = False,
) -> TrainingArguments:
    t = cfg.train
    extra = spec.trainer_options(cfg.method) if spec.trainer_options else {}
    return TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum_steps,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no",
        **extra,
        save_steps=t.save_steps or 500,
        **evaluation_arguments(t, has_validation),  # eval_loss, best checkpoint; rotation in a callback
        seed=t.seed,
        data_seed=t.seed,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=dtype == torch.bfloat16 and device.type == "cuda",
        use_cpu=device.type == "cpu",
        report_to=[],
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )


def memory_split(model: Any, split: MemorySplit, monitor: ResourceMonitor, framework: int) -> dict[str, int]:
    """Peak memory in parts: parameter, gradient and optimizer bytes exactly; activations (and
    everything else alive at the peak: the loss working set, gradients then alive) as the rest. On CUDA the peak is the allocator's; on the
    CPU it is the process RSS, of which `framework` (RSS before the model was loaded) is the
    libraries' own."""
    cuda = monitor.cuda_peak_allocated is not None
    peak = monitor.cuda_peak_allocated if cuda else monitor.peak_rss
    overhead = 0 if cuda else framework
    parts = {
        "weights_bytes": parameter_bytes(model),
        "trainable_bytes": parameter_bytes(model, trainable_only=True),
        "gradient_bytes": split.gradient_bytes,
        "optimizer_state_bytes": split.optimizer_state_bytes,
        "framework_bytes": overhead,
    }
    known = parts["weights_bytes"] + parts["optimizer_state_bytes"] + overhead
    return {
        **parts,
        "activations_and_rest_bytes": max(int(peak or 0) - known, 0),
        "peak_bytes": int(peak or 0),
    }


def train(
    cfg: RunConfig, progress: bool = True, resume_dir: Path | None = None, force: bool = False
) -> RunResult:
    """Train as `cfg` says; with `resume_dir`, continue that run from its newest complete checkpoint.

    Before the model is loaded, the memory estimate is printed; a run that will not fit is refused
    unless `force`."""
    checkpoint = checkpoint_to_resume(resume_dir) if resume_dir is not None else None
    spec = get_method(cfg.method.name)
    set_seed(cfg.train.seed)
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    source = resolve_source(cfg.model)
    # Dry run of the method on the architecture alone (meta device): a bad target module or rank
    # fails before any weights are read or a run folder exists. The estimate's own meta model is
    # that dry run; a resumed run (no estimate) prepares one just for the check.
    model_config = read_model_config(source, cfg.model)
    check_lengths(
        model_config,
        {
            seq_len_key(cfg): seq_len_of(cfg),
            "eval.window": cfg.eval.window if cfg.eval.enabled else None,
        },
    )
    if checkpoint is not None:
        spec.prepare(build_on_meta(source, cfg.model), cfg.method)
    load_options = spec.load_options(cfg.method, dtype) if spec.load_options else {}
    tokenizer = load_tokenizer(source, cfg.model)

    # Data first: bad data fails before a run folder or a model exists.
    task = build_task_data(cfg.data, tokenizer, cfg.train.seed, spec.head)
    eval_data = build_eval_inputs(cfg, tokenizer, task) if cfg.eval.enabled else None
    # The estimate after the data: on the CPU its overhead is this process's RSS, which now holds
    # the tokenizer and the tokenised data the run will hold too.
    estimate = preflight(cfg, model_config, dtype, force) if checkpoint is None else None
    released = device.type == "cpu" and must_release_memory(cfg.train.release_memory, estimate)
    if released:
        tame_glibc_malloc()  # peak RSS close to live memory (allocator.py)

    if resume_dir is not None and checkpoint is not None:
        run_dir = resume_dir
        manifest = json.loads((run_dir / "manifest.json").read_text())
        manifest.update(status="running", finished_at=None, error=None, traceback=None)
        manifest.setdefault("resumed", []).append({"from": checkpoint.name, "at": now_iso()})
        trim_log(run_dir / "log.jsonl", checkpoint_step(checkpoint))
        atomic_write_json(run_dir / "manifest.json", manifest)
        print(f"resuming {run_dir} from {checkpoint.name}")
    else:
        run_dir, manifest = _new_run(cfg, device, dtype, source, task, eval_data)
    try:
        metrics = _run(
            cfg,
            spec,
            run_dir,
            tokenizer,
            source,
            device,
            dtype,
            load_options,
            task,
            eval_data,
            progress,
            checkpoint,
        )
        metrics["release_memory"] = released
        if estimate is not None:
            metrics["estimate"] = {**estimate.memory.as_dict(), "capacity": estimate.capacity}
            atomic_write_json(run_dir / "metrics.json", metrics)
    except BaseException as exc:
        manifest.update(
            status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
            finished_at=now_iso(),
            error=f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__,
            traceback=traceback.format_exception(exc)[-3:],
        )
        atomic_write_json(run_dir / "manifest.json", manifest)
        raise
    manifest.update(status="completed", finished_at=now_iso())
    atomic_write_json(run_dir / "manifest.json", manifest)
    return RunResult(run_dir, "completed", metrics)


def _new_run(
    cfg: RunConfig,
    device: torch.device,
    dtype: torch.dtype,
    source: ModelSource,
    task: TaskData,
    eval_data: EvalInputs | None,
) -> tuple[Path, dict[str, Any]]:
    run_dir = create_run_dir(cfg.output.dir, default_run_name(cfg))
    atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
    manifest = {
        **base_manifest(cfg.train.seed),
        "run_dir": str(run_dir),
        "method": cfg.method.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": {
            "name": cfg.model.name,
            "source": source.description,
            "fingerprint": model_fingerprint(source),
        },
        "data": {
            "train_path": cfg.data.train_path,
            **task.stats,
            "eval_path": cfg.data.eval_path,
            "eval_tokens": len(eval_data.lm.ids) if eval_data and eval_data.lm else 0,
        },
    }
    atomic_write_json(run_dir / "manifest.json", manifest)
    print(f"run folder: {run_dir}")
    return run_dir, manifest


def _run(
    cfg: RunConfig,
    spec: MethodSpec,
    run_dir: Path,
    tokenizer: Any,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    load_options: dict[str, Any],
    task: TaskData,
    eval_data: EvalInputs | None,
    progress: bool,
    checkpoint: Path | None,
) -> dict[str, Any]:
    rss_before_model = psutil.Process().memory_info().rss  # the framework's own memory
    model: Any = load_model(source, cfg.model, device, dtype, load_options)
    # Real bytes of the loaded base weights (after quantisation, for 4-bit bases).
    metrics: dict[str, Any] = {"method": cfg.method.name, "base_weights_bytes": model.get_memory_footprint()}
    base_file = run_dir / "base_metrics.json"
    if eval_data is not None and checkpoint is not None and base_file.is_file():
        metrics["base"] = json.loads(base_file.read_text())  # measured before the interruption
    elif eval_data is not None:
        identity = model_identity(model_fingerprint(source), cfg, device, dtype, load_options)
        metrics["base"], metrics["base_eval_cached"] = evaluate_base(
            model, tokenizer, cfg, eval_data, identity, progress
        )
        atomic_write_json(base_file, metrics["base"])

    # label names (and the batches' pad id) where a head method reads them; causal LMs ignore them
    write_task_labels(model, task.label_names, getattr(task.collator, "pad_id", None))
    model = spec.prepare(model, cfg.method)
    if cfg.train.lean_mlp:
        lean_gated_mlps(model)
    counts = count_parameters(model)
    print(counts.line())
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()  # so checkpointed blocks see a grad path with a frozen base
    optimizer = spec.make_optimizer(model, cfg.method, cfg.train) if spec.make_optimizer else None
    metrics["loss_impl"] = choose_loss(cfg.train.loss, model, task, device)
    tally = PaddingTally(checkpoint)  # exact padding of the batches trained on (before the marker)
    measured_padding = tally.attach(model, task.collator)
    has_validation = task.validation_dataset is not None
    trainer = PeftlabTrainer(
        model=model,
        args=training_arguments(cfg, spec, run_dir, device, dtype, progress, has_validation),
        train_dataset=task.train_dataset,
        eval_dataset=task.validation_dataset,
        data_collator=task.collator,
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=[
            JsonlLogger(run_dir / "log.jsonl"),
            split := MemorySplit(),
            tally,
            CheckpointMarker(),
            KeepNewestAndBest(cfg.train.save_total_limit),
            interrupt := GracefulInterrupt(),
        ],
        chunked_loss=metrics["loss_impl"] == "chunked",
    )
    if progress:  # swap the stock bar (which prints every log dict) for one with loss in the bar
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(LossProgressBar())
    return_freed_heap()  # what loading and the base evaluation freed (allocator.py)
    layers = decoder_layers(model)
    trimmed = layers if device.type == "cpu" else None  # heap holes (allocator.py)
    blocked = device.type == "cpu" and cfg.train.causal_attention_blocks  # causal_blocks.py
    onednn = device.type == "cpu" and cfg.train.onednn_forward  # cpu_matmul.py
    with (
        heap_trimmed_every(trimmed, cfg.train.heap_trim_layers) as trims,
        norms_recomputed(layers if cfg.train.recompute_norms else None) as recompute,
        causal_attention_in_blocks(blocked) as attention_blocks,
        frozen_linears_on_onednn(model if onednn else None) as onednn_layers,
        ResourceMonitor() as monitor,
    ):
        metrics["heap_trims_per_forward"] = trims
        metrics["onednn_linear_layers"] = onednn_layers
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        train_seconds = time.perf_counter() - started
    # norm outputs rebuilt in backward over the run (0 where none was worth it: bf16, checkpointing)
    metrics["norm_outputs_recomputed"] = recompute.recipes if recompute is not None else 0
    # attention calls that skipped the masked half, training and validation forwards alike (0 off
    # the CPU, outside 256-512 tokens, or with an attention mask: padded or packed batches)
    metrics["attention_calls_in_blocks"] = attention_blocks.calls if attention_blocks is not None else 0
    if interrupt.requested:
        print(
            f"interrupted at step {trainer.state.global_step}; resume with: peftlab train --resume {run_dir}"
        )
        raise KeyboardInterrupt
    tokens_seen = trainer.state.num_input_tokens_seen
    validation = validation_summary(trainer.state, run_dir, checkpoint_step(checkpoint) if checkpoint else 0)
    padding = tally.as_dict() if measured_padding else {"padding_waste": task.stats["padding_waste"]}
    step_seconds = train_seconds - validation["eval_seconds"]  # speed leaves validation out

    if eval_data is not None:
        metrics["tuned"] = evaluate_model(model, tokenizer, cfg, eval_data, "tuned", progress)
        metrics["forgetting"] = record_comparison(run_dir, metrics["base"], metrics["tuned"], eval_data)
    artefact = run_dir / spec.artifact
    model.save_pretrained(artefact, safe_serialization=True)
    tokenizer.save_pretrained(artefact)

    log = read_log(run_dir / "log.jsonl")
    losses = [r["loss"] for r in log]
    metrics.update(
        trainable_params=counts.trainable,
        total_params=counts.total,
        trainable_percent=counts.percent,
        train_steps=trainer.state.global_step,
        train_loss=output.training_loss,
        first_logged_loss=losses[0] if losses else None,
        final_logged_loss=losses[-1] if losses else None,
        train_seconds=train_seconds,
        seconds_per_epoch=train_seconds / max(trainer.state.epoch or 1.0, 1e-9),
        real_tokens_trained=tokens_seen,
        tokens_per_second=tokens_seen / step_seconds if step_seconds > 0 else None,
        **validation,
        padding=padding,
        padding_waste=padding["padding_waste"],
        memory=monitor.as_dict(),
        memory_split=memory_split(model, split, monitor, rss_before_model),
        artefact=str(artefact.relative_to(run_dir)),
    )
    atomic_write_json(run_dir / "metrics.json", metrics)
    if eval_data is not None:
        plot_confusions(run_dir / "plots", {"base": metrics["base"], "tuned": metrics["tuned"]})
    if losses:
        from peftlab.reports.plots import plot_loss  # matplotlib costs ~35 MB RSS: load it after training

        plot_loss(
            log,
            run_dir / "plots" / "loss.png",
            title=f"{cfg.method.name} on {Path(cfg.data.train_path).name}",
        )
    print(
        f"train: {train_seconds:.1f} s, {metrics['tokens_per_second'] or 0:.0f} real tokens/s, peak RSS {gib(monitor.peak_rss)}"
    )
    return metrics
