"""Prompt tuning and prefix tuning (peft): learned virtual tokens; the whole base model stays frozen.

Prefix tuning starts, by default, from the base model's own keys and values (peft's
initialize_kv_prefix_from_past_key_values over a prefill of `num_virtual_tokens` fixed token ids):
peft's default N(0, 1) prefix is far outside the scale of real keys and values, and on SmolLM2-135M
it raised the first training loss from 3.1 to 10.6, still 11.0 after three steps at lr 1e-4
(bench/methods.py). From the model's own cache the prefix-tuned model starts as the base model
reading those tokens first, as Li & Liang (2021) recommend (initialise with activations of real
words).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from peft import PrefixTuningConfig as PeftPrefixConfig
from peft import PromptTuningConfig as PeftPromptConfig
from pydantic import Field

from peftlab.config.sections import MethodConfig
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
    init: Literal["model", "random"] = Field(
        "model",
        description="model: the base model's own keys/values over fixed token ids; random: peft's N(0, 1).",
    )


def prefill_ids(config: Any, n: int) -> torch.Tensor:
    """(1, n) fixed token ids the prefix is initialised from: BOS (where the model has one, so the
    first position is what the model is used to) and then ids spread evenly over the vocabulary."""
    ids = torch.linspace(0, config.vocab_size - 1, n).long()
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int):
        ids[0] = bos
    return ids[None]


@torch.no_grad()
def init_prefix_from_model(model: Any, n: int) -> None:
    from peft.tuners.cartridge.utils import initialize_kv_prefix_from_past_key_values

    param = next(model.parameters())
    if param.device.type == "meta":  # the estimate's dry run: no values to compute
        return
    ids = prefill_ids(model.get_base_model().config, n).to(param.device)
    with model.disable_adapter():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    initialize_kv_prefix_from_past_key_values(model, past_key_values=cache)


def prepare_prompt(model: torch.nn.Module, cfg: PromptTuningConfig) -> torch.nn.Module:
    return wrap(model, PeftPromptConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))


def prepare_prefix(model: torch.nn.Module, cfg: PrefixTuningConfig) -> torch.nn.Module:
    wrapped = wrap(model, PeftPrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type="CAUSAL_LM"))
    if cfg.init == "model":
        init_prefix_from_model(wrapped, cfg.num_virtual_tokens)
    return wrapped


register_method(MethodSpec(PromptTuningConfig, prepare_prompt, summary="learned soft prompt (peft)"))
register_method(
    MethodSpec(
        PrefixTuningConfig,
        prepare_prefix,
        summary="learned per-layer key/value prefix (peft)",
    )
)
