"""Prompt tuning and prefix tuning (peft): learned virtual tokens; the whole base model stays frozen."""

from __future__ import annotations

from typing import Literal

import torch
from peft import PrefixTuningConfig as PeftPrefixConfig
from peft import PromptTuningConfig as PeftPromptConfig
from pydantic import Field

from peftlab.config import MethodConfig
from peftlab.methods.peft_common import wrap
from peftlab.methods.registry import MethodSpec, register_method


class PromptTuningConfig(MethodConfig):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(
        16, gt=0, description="Learned soft-prompt tokens prepended to every input."
    )


class PrefixTuningConfig(MethodConfig):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(16, gt=0, description="Learned key/value prefix length in every layer.")


def prepare_prompt(model: torch.nn.Module, cfg: PromptTuningConfig) -> torch.nn.Module:
    return wrap(model, PeftPromptConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))


def prepare_prefix(model: torch.nn.Module, cfg: PrefixTuningConfig) -> torch.nn.Module:
    return wrap(model, PeftPrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))


register_method(
    MethodSpec("prompt_tuning", PromptTuningConfig, prepare_prompt, summary="learned soft prompt (peft)")
)
register_method(
    MethodSpec(
        "prefix_tuning",
        PrefixTuningConfig,
        prepare_prefix,
        summary="learned per-layer key/value prefix (peft)",
    )
)
