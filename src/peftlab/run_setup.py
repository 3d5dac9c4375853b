"""What training and evaluation set up alike, in one place: the device and dtype this machine runs
well, where the weights come from, the tokenizer, the task data (split and tokenised as training
sees it) and the method's load options. `peftlab train`, `peftlab eval RUN_DIR` and `peftlab eval
--config` all start here, so a re-evaluated run sees the very data and model its training saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.config.run import RunConfig
from peftlab.data.task import TaskData, build_task_data
from peftlab.methods import MethodSpec
from peftlab.model.loading import (
    ModelSource,
    check_lengths,
    load_tokenizer,
    pick_device,
    pick_dtype,
    read_model_config,
    resolve_source,
)


@dataclass
class RunSetup:
    device: torch.device
    dtype: torch.dtype
    source: ModelSource
    model_config: Any  # the architecture (no weights)
    tokenizer: Any
    task: TaskData
    load_options: dict[str, Any]  # the method's from_pretrained options ({} for a base model alone)


def set_up(cfg: RunConfig, spec: MethodSpec | None) -> RunSetup:
    """Device, dtype, source, architecture, tokenizer and task data for `cfg`; with `spec`, the
    method's data rows (its head) and load options; without, the base model as cfg.model loads it.

    Lengths over the model's position limit, then bad data, fail here: before a run folder or a
    model exists."""
    device = pick_device(cfg.model.device)
    dtype = pick_dtype(cfg.model.dtype, device)
    source = resolve_source(cfg.model)
    model_config = read_model_config(source, cfg.model)
    lengths = {"eval.window": cfg.eval.window if cfg.eval.enabled else None}
    if spec is not None:  # the rows a run trains on
        lengths[cfg.seq_len_key] = cfg.seq_len
    check_lengths(model_config, lengths)
    tokenizer = load_tokenizer(source, cfg.model)
    task = build_task_data(cfg.data, tokenizer, cfg.train.seed, spec.head if spec else "causal_lm")
    load_options = spec.load_options(cfg.method, dtype) if spec else {}
    return RunSetup(device, dtype, source, model_config, tokenizer, task, load_options)
