"""The whole run's config: the sections of config/sections.py, with the `method` section validated
by the config class of the method it names (the registry in methods/), and the checks that span
sections."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import Field, SerializeAsAny, field_validator, model_validator

from peftlab.config.sections import (
    DataConfig,
    EvalConfig,
    MethodConfig,
    ModelConfig,
    OutputConfig,
    Section,
    TrainConfig,
)
from peftlab.methods import get_method


class RunConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    method: SerializeAsAny[MethodConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @field_validator("method", mode="before")
    @classmethod
    def _method_by_name(cls, value: Any) -> Any:
        if isinstance(value, MethodConfig):
            return value
        if not isinstance(value, dict) or "name" not in value:
            raise ValueError("method needs a 'name' (a registered method)")
        return get_method(str(value["name"])).config_cls.model_validate(value)

    @model_validator(mode="after")
    def _evaluation_matches_checkpoints(self) -> RunConfig:
        t, d = self.train, self.data
        if t.eval_steps is not None and d.validation_fraction == 0 and d.validation_path is None:
            raise ValueError(
                "train.eval_steps needs a validation set: set data.validation_fraction > 0 or data.validation_path"
            )
        if t.eval_steps is not None and t.save_steps is not None and t.eval_steps != t.save_steps:
            raise ValueError(
                f"train.eval_steps ({t.eval_steps}) must equal train.save_steps ({t.save_steps}) so that "
                "the best checkpoint is one that was saved (or leave eval_steps unset)"
            )
        return self

    @model_validator(mode="after")
    def _method_fits_the_data(self) -> RunConfig:
        head = get_method(self.method.name).head
        if head == "sequence_classification":  # a head over a fixed label set; decided by the spec
            if self.data.kind != "classification":
                raise ValueError(
                    f"method {self.method.name} needs data.kind=classification (a fixed label set); "
                    f"got data.kind={self.data.kind}"
                )
            if self.train.loss == "chunked":
                raise ValueError(
                    f"train.loss=chunked is a causal-LM token loss; method {self.method.name} trains "
                    "with its head's cross-entropy over classes (use train.loss=auto or standard)"
                )
        return self

    @property
    def seq_len(self) -> int:
        """Tokens per training row: data.block_size for raw text, else data.max_seq_len."""
        return self.data.block_size if self.data.kind == "text" else self.data.max_seq_len

    @property
    def seq_len_key(self) -> str:
        """The config key that sets `seq_len`, for messages that name the knob."""
        return "data.block_size" if self.data.kind == "text" else "data.max_seq_len"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
