"""The typed sections of a run config (model, data, train, eval, output, and the base of every
method's section). This module imports nothing of peftlab: every other room may use it.

Every section forbids unknown keys, so a typo fails early with the nearest valid key named. The
whole run (config/run.py) validates the `method` section with the config class of the method it
names (methods/registry.py); config/loading.py reads YAML with `key.sub=value` overrides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, and no
    number may be infinite or NaN (`lr: .inf` would train to NaN weights, `epochs: .inf` forever)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="A built-in alias (smollm2-135m-instruct), a hub id, a local folder, or a .gguf file.",
    )
    gguf_file: str | None = Field(
        None, description="GGUF file name inside `name` when `name` is a folder or hub id."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype; auto picks bf16 on hardware that runs it fast, else fp32."
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, then mps, then cpu."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code from the hub; off unless you trust it."
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickle weights (pytorch_model.bin) when a folder has no safetensors; they are "
        "still read with torch.load(weights_only=True). Only for files you trust.",
    )


class DataConfig(Section):
    kind: Literal["text", "classification", "chat"] = Field(
        "text", description="Record kind: text (language modelling), classification (text + label), chat."
    )
    train_path: str = Field(
        ..., description="A text file/folder, a jsonl/json/csv/tsv/parquet file, or a hub data set name."
    )
    eval_path: str | None = Field(None, description="Held-out text to evaluate perplexity on.")
    block_size: int = Field(512, ge=2, description="Tokens per training block.")
    document_split: Literal["file", "blank_lines", "wikitext_headings"] = Field(
        "wikitext_headings",
        description="How a raw text file is cut into documents: one per file, at blank lines, "
        "or at wikitext top-level headings (' = Title = ').",
    )
    keep_documents_apart: bool = Field(
        False,
        description="False: concatenate documents (EOS between) and cut into full blocks (the classic "
        "recipe). True: each document is cut into its own blocks, the last one padded.",
    )
    max_train_tokens: int | None = Field(
        None, ge=1, description="Cut the training token stream to this many tokens."
    )
    max_eval_tokens: int | None = Field(
        None, ge=2, description="Evaluate on the first N tokens of eval_path only."
    )
    # --- structured data (data/formats.py, templates.py, splits.py); the text path ignores these ---
    format: Literal[
        "auto", "text", "alpaca", "sharegpt", "messages", "prompt_completion", "classification"
    ] = Field("auto", description="Record format; auto detects it from the fields of the first record.")
    file_format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "text", "hub"] = Field(
        "auto", description="File format; auto uses the file suffix."
    )
    header: bool | None = Field(None, description="csv/tsv: first row is a header (None: guess).")
    columns: list[str] | None = Field(None, description="csv/tsv without header: column names.")
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Field mapping, canonical name -> name in the data (text: sentence).",
    )
    test_path: str | None = Field(None, description="Held-out records; else split from train_path.")
    label_names: list[str] | None = Field(
        None, description="Label names; integer labels index this list. None: the sorted labels in the data."
    )
    prompt_template: str = Field(
        "{text}\nAnswer:", description="Classification prompt ({text}); the label follows after a space."
    )
    chat_template: Literal["model", "chatml"] = Field(
        "model", description="model: the tokenizer's own template (chatml when it has none)."
    )
    train_on: Literal["assistant", "all"] = Field("assistant", description="Which tokens carry loss in chat.")
    max_seq_len: int = Field(1024, ge=8, description="Longest example / packed block, in tokens.")
    packing: bool = Field(
        True, description="Pack short examples into max_seq_len blocks (no cross attention)."
    )
    truncation: Literal["truncate", "drop"] = Field("truncate", description="Over-long examples.")
    on_error: Literal["fail", "skip"] = Field("fail", description="Bad records: stop, or skip and count.")
    sample: float | None = Field(
        None, gt=0, description="Use n records (>= 1) or a fraction (< 1) of train, seeded."
    )
    test_sample: float | None = Field(None, gt=0, description="Same for the held-out records.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Held-out share when there is no test_path.")
    group_key: str | None = Field(
        None, description="Split by this field (e.g. conversation_id), never by record."
    )
    validation_fraction: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Validation share held out of train when there is no validation_path (structured "
        "data: whole groups of the sampled train records; raw text: the last blocks). 0 turns it off.",
    )
    validation_path: str | None = Field(
        None, description="Validation data (same kind and format as train_path); replaces the split."
    )
    dedupe: bool = Field(
        True, description="Remove train records that also occur in the test or validation set."
    )
    cache: bool = Field(True, description="Cache tokenised data (keyed by data, tokenizer and settings).")

    @field_validator("label_names")
    @classmethod
    def _label_names_usable(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if not names:
            raise ValueError("is empty; list the label names, or null to take them from the data")
        if any(not name.strip() for name in names):
            raise ValueError("holds an empty name; every label needs a name")
        if any(name != name.strip() for name in names):
            raise ValueError("holds a name with leading or trailing spaces (labels in the data are stripped)")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"names {', '.join(map(repr, repeated))} more than once; list each label once")
        return names


class TrainConfig(Section):
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training blocks (ignored when max_steps is set)."
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(4, ge=1, description="Blocks per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 turns clipping off.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    seed: int = Field(42, description="Seed for python, numpy, torch and the data order.")
    save_steps: int | None = Field(None, ge=1, description="Write a checkpoint every N steps.")
    save_total_limit: int | None = Field(
        2,
        ge=1,
        description="Keep the newest N checkpoints plus the one with the lowest validation loss.",
    )
    eval_steps: int | None = Field(
        None,
        ge=1,
        description="Validation loss every N steps; None: at every save (save_steps), else at each "
        "epoch end. Must equal save_steps when both are set, so the best checkpoint exists.",
    )
    logging_steps: int = Field(1, ge=1)
    release_memory: bool | Literal["auto"] = Field(
        "auto",
        description="CPU runs: give freed activation memory back to the system at once (fixed glibc malloc "
        "thresholds), so peak RSS stays near the live memory the estimate predicts, at a speed cost where "
        "page faults are expensive (VMs); false: glibc keeps freed memory for reuse (faster, higher peak "
        "RSS); auto: release only when the estimate times glibc's retention would not fit in RAM. glibc "
        "cannot undo it: later runs in the same process train under it (recorded in metrics.json).",
    )
    heap_trim_layers: int = Field(
        5,
        ge=0,
        description="CPU runs: give glibc's free heap pages back to the system after every N-th decoder "
        "layer of a training forward pass (little is left to give with release_memory true), so holes "
        "left by freed temporaries do not count in peak RSS, for a few page faults; 0: never.",
    )
    loss: Literal["auto", "chunked", "standard"] = Field(
        "auto",
        description="chunked: the causal-LM loss a chunk of tokens at a time, never holding the whole "
        "logits tensor (less memory, faster); standard: the model's own loss; auto: chunked when it "
        "equals the model's own loss on the first batch, else standard.",
    )
    lean_mlp: bool = Field(
        True,
        description="Silu-gated MLPs (Llama, Mistral, Qwen2, SmolLM2) keep two activations for backward "
        "instead of three: less memory, the same values.",
    )
    recompute_norms: bool = Field(
        True,
        description="The decoder layers' norm outputs that adapters keep for backward (LoRA's input "
        "on q/k/v) are rebuilt from the norm's input in backward instead: less memory, the same values.",
    )
    onednn_forward: bool = Field(
        True,
        description="CPU fp32 runs compute frozen linear layers' forward (and the chunked loss's "
        "logits) on oneDNN, which PyTorch ships, instead of MKL: faster matmuls at a little more peak "
        "RSS (README); the same values to fp32 rounding.",
    )
    causal_attention_blocks: bool = Field(
        True,
        description="CPU fp32 runs at 256-512 tokens without an attention mask (not padded or packed "
        "batches) compute causal attention in 128-query blocks, each against the keys before it, "
        "so the masked half is skipped (PyTorch's CPU kernel computes it); the same values to float "
        "rounding.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers the Trainer reports to (a name or a list; none or []: none). "
        "TensorBoard events go to <run>/tensorboard and wandb's files to <run>/wandb, with the run "
        "config and the final metrics; offline wandb is WANDB_MODE=offline, the user's choice.",
    )
    tracker_group: str | None = Field(
        None,
        description="Groups runs in the trackers: the W&B group, the MLflow experiment, the Trackio "
        "project. A sweep sets its name; TensorBoard groups by folder (--logdir the sweep folder).",
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_list(cls, value: object) -> object:
        """`wandb` means [wandb]; `none`, [none] and null mean no tracker; each tracker once."""
        if value is None or value == "none" or value == ["none"]:
            return []
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            if "none" in value:
                raise ValueError("'none' cannot be listed with trackers; use none or [] for no tracker")
            return list(dict.fromkeys(value))
        return value

    @field_validator("tracker_group")
    @classmethod
    def _group_named(cls, group: str | None) -> str | None:
        if group is not None and not group.strip():
            raise ValueError("is empty; use null for no group")
        return group


DEFAULT_FORGETTING_TEXT = "../shared/data/wikitext-2-raw-v1/wiki.test.raw"
DEFAULT_SAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn leaves.",
    "Give three tips for staying focused while studying.",
    "What is 17 multiplied by 3?",
    "Translate 'Good morning, how are you?' into Spanish.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that returns the square of a number.",
    "What should I pack for a weekend hiking trip?",
    "Suggest a name for a small neighbourhood bakery.",
)


class EvalConfig(Section):
    enabled: bool = Field(True, description="Evaluate the base and the tuned model with the same code.")
    window: int = Field(512, ge=2, description="Sliding-window length L for perplexity.")
    stride: int = Field(256, ge=1, description="Sliding-window stride S (S <= L); each token is scored once.")
    batch_size: int = Field(4, ge=1, description="Windows (or prompts) per forward pass.")
    max_new_tokens: int = Field(
        64, ge=1, description="Greedy generation: new tokens per answer (chat eval and sample prompts)."
    )
    length_normalise: bool = Field(
        False,
        description="Classification: score a label by its mean token log-likelihood instead of the sum.",
    )
    max_examples: int | None = Field(
        64,
        ge=1,
        description="Score at most the first N held-out records in classification and chat eval "
        "(keeps CPU runs short); None: all.",
    )
    forgetting_path: str | None = Field(
        "auto",
        description="General held-out text for forgetting (tuned minus base cross-entropy). auto: "
        f"{DEFAULT_FORGETTING_TEXT} when it exists (else forgetting is skipped with the reason in "
        "metrics.json); a path: that text file (must exist); null: no forgetting.",
    )
    forgetting_max_tokens: int = Field(
        4096, ge=2, description="Score the first N tokens of the forgetting text."
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS),
        description="Prompts answered by base and tuned model (greedy), written to samples.md and "
        "samples.jsonl in the run folder; [] for none.",
    )
    cache: bool = Field(
        True,
        description="Reuse the base model's evaluation from $PEFTLAB_CACHE/evals when the model, "
        "evaluation inputs and settings are the same (a sweep evaluates its base once).",
    )

    @model_validator(mode="after")
    def _stride_within_window(self) -> EvalConfig:
        if self.stride > self.window:
            raise ValueError(f"eval.stride ({self.stride}) must be <= eval.window ({self.window})")
        if any(not p.strip() for p in self.sample_prompts):
            raise ValueError("eval.sample_prompts holds an empty prompt")
        if self.forgetting_path is not None and not self.forgetting_path.strip():
            raise ValueError("eval.forgetting_path is empty; use null to turn forgetting off")
        return self


class OutputConfig(Section):
    dir: str = Field("runs", description="Folder that holds run folders.")
    name: str | None = Field(None, description="Run folder name; default '<method>-<timestamp>'.")


class MethodConfig(Section):
    """Base of every method's config; each method subclasses it (methods/<name>.py)."""

    name: str = Field(..., description="A registered method name.")
