"""Memory a training run will need, from the model's config alone (meta device, no weights).

Every figure comes from the real objects of the run, built on the meta device, rather than from a
formula per architecture or per method:
- weights, trainable parameters and gradients: the prepared model's own parameters and dtypes
  (4-bit weights: bitsandbytes' packed size plus its quantisation constants);
- optimizer state: the run's own optimizer (the one the Trainer would build, or the method's),
  stepped once on meta gradients, its state tensors summed as `resources.tensor_bytes` measures them;
- activations: one forward pass on meta inputs of the run's shape, summing the distinct tensors
  autograd saves for backward (parameters excluded). Attention is traced with the fused
  (flash / memory-efficient) kernel that real runs use on CUDA and on the CPU, which saves the
  output and the log-sum-exp, not the (T x T) probabilities;
- with gradient checkpointing, only each layer's input is kept, plus one layer's activations while
  it is recomputed;
- the loss working set: the chunked loss keeps one chunk of fp32 logits and their gradient; the
  stock loss keeps logits, their fp32 copy, the log-softmax and its gradient (B x T x V each).
The peak is modelled as framework overhead + weights + optimizer state + max(activations + loss
working set, gradients): gradients are set to None after every step, so at the end of the next
forward (where activations peak) they do not exist, and they grow in backward as activations go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from peftlab.config.run import RunConfig
from peftlab.methods import get_method
from peftlab.model.chunked_loss import CHUNK_ROWS
from peftlab.model.lean_mlp import lean_gated_mlps
from peftlab.model.norm_recompute import NormRecompute, layer_norms
from peftlab.model.structure import decoder_layers, write_task_labels
from peftlab.sizing.resources import tensor_bytes


@dataclass
class MemoryEstimate:
    """Bytes of each part of a training run's peak memory (see the module docstring)."""

    batch_size: int
    seq_len: int
    dtype: str
    weights: int
    trainable_params: int
    trainable_bytes: int
    gradients: int
    optimizer_state: int
    activations: int  # without gradient checkpointing
    activations_checkpointed: int
    loss_working_set: int
    overhead: int
    gradient_checkpointing: bool
    total_params: int
    matmul_params: int  # weights that take part in matmuls (for FLOPs)
    trainable_matmul_params: int
    attention_width: int  # sum over layers of the attention width (heads x head dim), for FLOPs

    @property
    def activations_used(self) -> int:
        return self.activations_checkpointed if self.gradient_checkpointing else self.activations

    @property
    def total(self) -> int:
        transient = max(self.activations_used + self.loss_working_set, self.gradients)
        return self.overhead + self.weights + self.optimizer_state + transient

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "activations_used": self.activations_used, "total": self.total}


def estimate_memory(
    cfg: RunConfig, model_config: Any, dtype: torch.dtype, overhead: int, loss: str = "chunked"
) -> MemoryEstimate:
    """The memory of training `cfg` on a model of `model_config` in `dtype`; `loss` is 'chunked'
    or 'standard'; `overhead` is the framework's own memory (process RSS, or the CUDA context)."""
    from transformers import AutoModelForCausalLM

    spec = get_method(cfg.method.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    quantised = _quantised_weights(model, spec.load_options(cfg.method, dtype))
    # A head method reads the label count from the config: the data's label names when the config
    # lists them, else the config default (2); the head is tiny either way.
    write_task_labels(model, cfg.data.label_names if cfg.data.kind == "classification" else None)
    model = spec.prepare(model, cfg.method)
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(quantised.get(id(p), p.numel() * p.element_size()) for p in params)
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    batch, seq = cfg.train.batch_size, cfg.seq_len
    # Recipes only in fp32: a bf16 CUDA run trains under autocast, whose adapters save a bf16 copy
    # of the norm output (not modelled here) rather than the output a recipe could replace.
    recompute = cfg.train.recompute_norms and dtype == torch.float32
    with lean_gated_mlps(model if cfg.train.lean_mlp else None):  # traced as the run trains it
        activations, checkpointed = _activation_bytes(model, batch, seq, recompute)
    vocab = int(model_config.vocab_size)
    if spec.head != "causal_lm":  # class logits (B x labels): no vocabulary-sized working set
        loss_bytes = 0
    elif loss == "chunked":  # one chunk of fp32 logits + its gradient in the model dtype
        loss_bytes = min(CHUNK_ROWS, batch * seq) * vocab * (4 + _itemsize(dtype))
    else:  # logits, their fp32 copy, log-softmax, gradient
        loss_bytes = batch * seq * vocab * (_itemsize(dtype) + 3 * 4)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    matmul = sum(m.weight.numel() for m in linear)
    trainable_matmul = sum(m.weight.numel() for m in linear if m.weight.requires_grad)
    gradient_checkpointing = cfg.train.gradient_checkpointing or spec.checkpoints_activations(cfg.method)
    return MemoryEstimate(
        batch_size=batch,
        seq_len=seq,
        dtype=str(dtype).removeprefix("torch."),
        weights=weights,
        trainable_params=sum(p.numel() for p in trainable),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        gradients=sum(p.numel() * p.element_size() for p in trainable),
        optimizer_state=_optimizer_state_bytes(cfg, spec, model),
        activations=activations,
        activations_checkpointed=checkpointed,
        loss_working_set=loss_bytes,
        overhead=overhead,
        gradient_checkpointing=gradient_checkpointing,
        total_params=sum(p.numel() for p in params),
        matmul_params=matmul,
        trainable_matmul_params=trainable_matmul,
        attention_width=_attention_width(model_config),
    )


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _quantised_weights(model: Any, load_options: dict[str, Any]) -> dict[int, int]:
    """id(weight) -> bytes for the weights bitsandbytes would store in 4 bits.

    bitsandbytes packs two 4-bit values per byte and keeps one absmax per block of 64 values
    (fp32, or with double quantisation 8 bits plus an fp32 per 256 blocks). transformers leaves the
    output head (and llm_int8_skip_modules) unquantised.
    """
    quant = load_options.get("quantization_config")
    if quant is None or not getattr(quant, "load_in_4bit", False):
        return {}
    skip = set(getattr(quant, "llm_int8_skip_modules", None) or [])
    head = model.get_output_embeddings()
    sizes: dict[int, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or name.split(".")[-1] in skip:
            continue
        n = module.weight.numel()
        blocks = -(-n // 64)
        stats = blocks + 4 * -(-blocks // 256) if quant.bnb_4bit_use_double_quant else 4 * blocks
        sizes[id(module.weight)] = -(-n // 2) + stats
    return sizes


def _attention_width(config: Any) -> int:
    text = getattr(config, "text_config", config)
    layers = int(getattr(text, "num_hidden_layers", 0))
    heads = int(getattr(text, "num_attention_heads", 0))
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // max(heads, 1))
    return layers * heads * int(head_dim)


def _optimizer_state_bytes(cfg: RunConfig, spec: Any, model: Any) -> int:
    """Build the run's optimizer over the meta parameters, step it once, sum its state."""
    from transformers import Trainer, TrainingArguments

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = spec.make_optimizer(model, cfg.method, cfg.train)
    eight_bit = False  # bitsandbytes' 8-bit AdamW, as the Trainer builds it
    if optimizer is None:
        args = TrainingArguments(
            output_dir="unused", use_cpu=True, report_to=[], **spec.optimizer_arguments(cfg.method, cfg.train)
        )
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = dict(kwargs)
        groups = kwargs.pop("params", None) or [{"params": trainable}]
        if "fused" in kwargs:
            kwargs["fused"] = False  # the fused kernel refuses meta tensors; its state is the same
        optimizer = cls(groups, **kwargs)
        eight_bit = "bitsandbytes" in str(cls) and kwargs.get("optim_bits") == 8
    with _embeddings_at_32_bits(model) if eight_bit else contextlib.nullcontext():
        for p in trainable:
            p.grad = torch.zeros_like(p)
        with contextlib.suppress(RuntimeError, NotImplementedError):
            # A state that is built lazily inside the kernel (none of the supported ones) would be
            # missing from the sum, never double counted.
            optimizer.step()
        for p in trainable:
            p.grad = None
    return tensor_bytes(list(optimizer.state.values()))


@contextlib.contextmanager
def _embeddings_at_32_bits(model: Any) -> Iterator[None]:
    """As Trainer.create_optimizer does, embeddings keep 32-bit state under 8-bit AdamW: an override
    in bitsandbytes' process-wide GlobalOptimManager, read at the first step. The entries added for
    these meta modules are taken out again afterwards."""
    import bitsandbytes

    manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
    triples, configs = len(manager.module_weight_config_triple), set(manager.pid2config)
    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
        yield
    finally:
        del manager.module_weight_config_triple[triples:]
        for key in set(manager.pid2config) - configs:
            del manager.pid2config[key]


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Trace attention as the fused CPU/CUDA kernels save it (output + log-sum-exp); on the meta
    device torch would otherwise pick the math kernel, which saves the (T x T) probabilities."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if k.shape[-3] != q.shape[-3] and not enable_gqa:  # key/value heads repeated by the caller
            repeat = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
        # With enable_gqa the real kernels keep the un-repeated key/value heads; the meta kernel
        # accepts fewer key/value heads than query heads, so they are passed as they are.
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
        )
        return out

    functional.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _activation_bytes(model: Any, batch: int, seq: int, recompute_norms: bool) -> tuple[int, int]:
    """(saved bytes without checkpointing, with checkpointing) for one training forward; with
    recompute_norms, the norm outputs training rebuilds in backward (recompute.py) are not counted."""
    if getattr(model, "is_gradient_checkpointing", False):  # traced without, derived below
        model.gradient_checkpointing_disable()
    model.train()
    layers = decoder_layers(model)  # the stack training hooks (trims, norm recipes)
    param_storages = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen: set[StorageWeakRef] = set()
    per_layer: dict[int, int] = {}
    layer_inputs: dict[int, int] = {}
    current = [-1]  # index of the layer running now; -1 outside the layer stack

    # Its hooks are asked what training would keep (only the innermost saved-tensor hooks run).
    recompute = NormRecompute(layer_norms(layers)) if recompute_norms and layers is not None else None

    # Under gradient checkpointing the checkpoint's own hooks run inside the layers instead, so
    # the layer rerun in backward keeps what it saves without recipes: counted apart.
    plain_seen: set[StorageWeakRef] = set()
    plain_per_layer: dict[int, int] = {}

    def count(t: torch.Tensor, seen: set[StorageWeakRef], per_layer: dict[int, int]) -> None:
        ref = StorageWeakRef(t.untyped_storage())
        if ref not in param_storages and ref not in seen:
            seen.add(ref)
            per_layer[current[0]] = per_layer.get(current[0], 0) + t.untyped_storage().nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(recompute.held(recompute.pack(t)) if recompute is not None else t, seen, per_layer)
        count(t, plain_seen, plain_per_layer)
        return t

    hooks = []
    if layers is not None:
        for index, layer in enumerate(layers):

            def enter(module: Any, args: Any, kwargs: Any, index: int = index) -> None:
                current[0] = index
                hidden = args[0] if args else kwargs.get("hidden_states")
                if isinstance(hidden, torch.Tensor):
                    layer_inputs[index] = hidden.numel() * hidden.element_size()

            def leave(module: Any, args: Any, output: Any) -> None:
                current[0] = -1

            hooks.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            hooks.append(layer.register_forward_hook(leave))
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
        if recompute is not None:
            recompute.remove()
    total = sum(per_layer.values())
    in_layers = [v for k, v in plain_per_layer.items() if k >= 0]
    if not in_layers:
        return total, total
    checkpointed = per_layer.get(-1, 0) + sum(layer_inputs.values()) + max(in_layers)
    # Layers below the first trainable one save nothing, so checkpointing cannot save more.
    return total, min(total, checkpointed)
