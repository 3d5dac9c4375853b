"""QLoRA (Dettmers et al. 2023): LoRA adapters over a 4-bit quantised base (bitsandbytes).

QLoRA is LoRA with a quantised base, not a second copy of LoRA: the config extends LoraConfig with
the quantisation settings, `load_options` asks from_pretrained for a 4-bit model, and `prepare`
runs peft's k-bit training preparation before injecting the same LoRA adapters.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from peft import prepare_model_for_kbit_training
from pydantic import Field, model_validator

from peftlab.errors import MethodError
from peftlab.methods.lora import LoraConfig, lora_plus_optimizer, peft_lora_config
from peftlab.methods.peft_common import wrap
from peftlab.methods.registry import MethodSpec, register_method


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit data type of the frozen base weights."
    )
    double_quant: bool = Field(
        True, description="Quantise the quantisation constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="dtype the 4-bit weights are de-quantised to for matmuls; auto = the run's dtype."
    )
    gradient_checkpointing: bool = Field(
        False, description="peft's k-bit preparation with gradient checkpointing (saves activation memory)."
    )

    @model_validator(mode="after")
    def _loftq_needs_a_full_precision_base(self) -> QLoraConfig:
        if self.init == "loftq":  # LoftQ quantises the base itself and fits the adapters to the error
            raise ValueError("qlora loads an already 4-bit base; for LoftQ use method lora with init=loftq")
        return self


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError(
            "qlora needs bitsandbytes: pip install 'peftlab[quant]' (or pip install bitsandbytes)"
        )


def load_options(cfg: QLoraConfig, dtype: torch.dtype) -> dict[str, Any]:
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    compute = dtype if cfg.compute_dtype == "auto" else getattr(torch, cfg.compute_dtype)
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.quant_type,
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
    }


def prepare(model: torch.nn.Module, cfg: QLoraConfig) -> torch.nn.Module:
    require_bitsandbytes()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return wrap(model, peft_lora_config(cfg), cfg.target_modules)


register_method(
    MethodSpec(
        QLoraConfig,
        prepare,
        summary="LoRA over a 4-bit (nf4/fp4) bitsandbytes base",
        make_optimizer=lora_plus_optimizer,
        load_options=load_options,
        checkpoints_activations=lambda cfg: cfg.gradient_checkpointing,
    )
)
