"""Will it fit, and how long will it take: the estimate of sizing/estimate.py against a device.

`plan(cfg, gpu)` reads the model's config (no weights), estimates memory for the run's shape, finds
the largest batch size and sequence length that fit the device, estimates time from FLOPs, and
says which knob to turn when the run does not fit. `peftlab estimate` prints it; `peftlab train`
prints it and refuses a run that will not fit unless forced.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch

from peftlab.config.run import RunConfig
from peftlab.sizing.estimate import MemoryEstimate, estimate_memory
from peftlab.sizing.resources import gib


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float  # what torch can allocate
    peak_tflops: float  # dense tensor-core peak in the dtype peftlab picks there (datasheet)
    bf16: bool


# Datasheet peaks (dense, no sparsity). T4 has no bf16, so peftlab trains there in fp32 (8.1 TF).
GPUS = {
    "t4": Gpu("T4 (15 GB)", 15.0, 8.1, bf16=False),
    "a10g": Gpu("A10G (24 GB)", 22.0, 70.0, bf16=True),
    "l4": Gpu("L4 (24 GB)", 22.0, 121.0, bf16=True),
    "4090": Gpu("RTX 4090 (24 GB)", 23.5, 82.6, bf16=True),  # bf16 with fp32 accumulation
    "a100-40": Gpu("A100 40 GB", 39.5, 312.0, bf16=True),
    "a100-80": Gpu("A100 80 GB", 79.0, 312.0, bf16=True),
    "h100": Gpu("H100 80 GB (SXM)", 79.0, 989.0, bf16=True),
}
GPU_UTILISATION = 0.40  # model FLOPs utilisation assumed on a GPU (typical for single-GPU fine-tuning)
CPU_UTILISATION = 0.50  # measured 52% for packed LoRA on SmolLM2 (bench/train_speed.py)
# Peak RSS with glibc's default malloc over the live memory the estimate counts: 5.45 GiB against
# 3.25 GiB on a SmolLM2 LoRA step (512 x 4, fp32; cpu/malloc.py, bench/train_speed.py).
GLIBC_RETENTION = 1.7
CUDA_OVERHEAD = int(0.75 * 2**30)  # CUDA context, cuBLAS workspace and allocator slack (stated)


@dataclass
class Plan:
    memory: MemoryEstimate
    device: str
    capacity: int
    fits: bool
    largest_batch: int
    largest_seq_len: int
    flops_per_token: float
    tokens_per_second: float
    throughput_source: str
    advice: str

    def seconds_for(self, tokens: int) -> float:
        return tokens / self.tokens_per_second


def flops_per_token(memory: MemoryEstimate, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token: 2 per matmul weight forward, 2 backward for the input gradients
    (which must flow through frozen layers to reach adapters below), 2 more for each trainable
    matmul weight's gradient; with checkpointing one more forward. Full training: the usual ~6N.
    Attention scores add 4 x T x width forward (Q K^T and A V), twice that in backward."""
    forward = 2.0 * memory.matmul_params + 4.0 * memory.seq_len * memory.attention_width
    backward = 2.0 * memory.matmul_params + 2.0 * memory.trainable_matmul_params
    backward += 8.0 * memory.seq_len * memory.attention_width
    return forward * (2 if gradient_checkpointing else 1) + backward


@functools.lru_cache(maxsize=4)
def measured_cpu_flops(seconds: float = 0.5) -> float:
    """Peak fp32 matmul FLOP/s of this machine's CPU, measured with torch.mm (once per process:
    every train() estimates, and a sweep should not pay for the measurement each time)."""
    # Its own generator: the global RNG must not depend on whether this ran (adapter init follows it).
    a = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # (1024, 1024)
    a @ a
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ a
        runs += 1
    return 2 * 1024**3 * runs / (time.perf_counter() - start)


def device_capacity(gpu: str | None) -> tuple[str, int, float, str]:
    """(device label, usable bytes, assumed training FLOP/s, where the FLOP/s figure comes from)."""
    if gpu is not None:
        g = GPUS[gpu]
        return (
            g.name,
            int(g.memory_gib * 2**30),
            g.peak_tflops * 1e12 * GPU_UTILISATION,
            (f"datasheet peak {g.peak_tflops:g} TFLOP/s x {GPU_UTILISATION:.0%} utilisation"),
        )
    if torch.cuda.is_available():
        _free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        # No datasheet for an unnamed GPU: a measured matmul peak stands in for it.
        a = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)).cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        peak = 10 * 2 * 4096**3 / (time.perf_counter() - start)
        return (
            name,
            int(total),
            peak * GPU_UTILISATION,
            (f"measured matmul peak {peak / 1e12:.1f} TFLOP/s x {GPU_UTILISATION:.0%} utilisation"),
        )
    peak = measured_cpu_flops()
    usable = psutil.virtual_memory().available + psutil.Process().memory_info().rss
    return (
        "cpu",
        int(usable),
        peak * CPU_UTILISATION,
        (f"measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s x {CPU_UTILISATION:.0%} utilisation"),
    )


def framework_overhead(gpu: str | None) -> int:
    """Memory that is not the model's: the CUDA context on a GPU; on the CPU this process's RSS
    now, measured (torch, transformers, peft imported; in `peftlab train` also the tokenizer and
    the tokenised data)."""
    if gpu is not None or torch.cuda.is_available():
        return CUDA_OVERHEAD
    return int(psutil.Process().memory_info().rss)


def _with_shape(memory: MemoryEstimate, batch: int, seq: int) -> MemoryEstimate:
    """Scale the shape-dependent parts linearly (activations grow with B x T under fused
    attention; the chunked loss's working set is fixed, the stock loss grows with B x T)."""
    scale = (batch * seq) / (memory.batch_size * memory.seq_len)
    return replace(
        memory,
        batch_size=batch,
        seq_len=seq,
        activations=int(memory.activations * scale),
        activations_checkpointed=int(memory.activations_checkpointed * scale),
    )


def largest_fitting(memory: MemoryEstimate, capacity: int, limit: int, by: str) -> int:
    """Largest batch size (by='batch') or sequence length (by='seq') with total <= capacity."""
    best, low, high = 0, 1, limit
    while low <= high:
        mid = (low + high) // 2
        shape = (mid, memory.seq_len) if by == "batch" else (memory.batch_size, mid)
        if _with_shape(memory, *shape).total <= capacity:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def plan(
    cfg: RunConfig,
    model_config: Any,
    gpu: str | None = None,
    loss: str = "chunked",
    dtype: torch.dtype | None = None,
) -> Plan:
    from peftlab.model.loading import pick_device, pick_dtype

    device, capacity, flops, source = device_capacity(gpu)
    if dtype is None:
        if gpu is not None:
            dtype = torch.bfloat16 if GPUS[gpu].bf16 else torch.float32
        else:
            dtype = pick_dtype(cfg.model.dtype, pick_device(cfg.model.device))
    overhead = framework_overhead(gpu)
    memory = estimate_memory(cfg, model_config, dtype, overhead, loss)
    seq_limit = int(getattr(model_config, "max_position_embeddings", 0) or 131072)
    largest_batch = largest_fitting(memory, capacity, 4096, "batch")
    largest_seq = largest_fitting(memory, capacity, seq_limit, "seq")
    fits = memory.total <= capacity
    fpt = flops_per_token(memory, memory.gradient_checkpointing)
    return Plan(
        memory=memory,
        device=device,
        capacity=capacity,
        fits=fits,
        largest_batch=largest_batch,
        largest_seq_len=largest_seq,
        flops_per_token=fpt,
        tokens_per_second=flops / fpt,
        throughput_source=source,
        advice="" if fits else advice(cfg, memory, capacity, largest_batch, largest_seq),
    )


def advice(cfg: RunConfig, memory: MemoryEstimate, capacity: int, batch: int, seq: int) -> str:
    """The first knob that makes the run fit."""
    if not memory.gradient_checkpointing and replace(memory, gradient_checkpointing=True).total <= capacity:
        return "set train.gradient_checkpointing=true"
    if batch >= 1:
        return f"set train.batch_size={batch} (and train.grad_accum_steps to keep the effective batch)"
    if seq >= 8:
        return f"set {cfg.seq_len_key}={seq} or shorter"
    return "use a method with a smaller footprint (qlora) or a smaller model"


def render(plan_: Plan, cfg: RunConfig, tokens: int | None = None) -> str:
    m = plan_.memory
    ckpt = "on" if m.gradient_checkpointing else "off"
    rows = [
        ("weights", gib(m.weights)),
        ("trainable parameters", f"{m.trainable_params:,d} ({gib(m.trainable_bytes)})"),
        ("gradients", gib(m.gradients)),
        ("optimizer state", gib(m.optimizer_state)),
        ("activations, no checkpointing", gib(m.activations)),
        ("activations, gradient checkpointing", gib(m.activations_checkpointed)),
        ("loss working set", gib(m.loss_working_set)),
        ("framework overhead", gib(m.overhead)),
        (f"total (checkpointing {ckpt})", gib(m.total)),
        (f"device: {plan_.device}", f"{gib(plan_.capacity)} usable"),
        ("fits", "yes" if plan_.fits else f"NO: {plan_.advice}"),
        (f"largest batch at {cfg.seq_len_key}={m.seq_len}", str(plan_.largest_batch)),
        (f"largest sequence at train.batch_size={m.batch_size}", str(plan_.largest_seq_len)),
        ("training FLOPs per token", f"{plan_.flops_per_token / 1e9:.2f} GFLOP"),
        ("throughput", f"{plan_.tokens_per_second:,.0f} tokens/s ({plan_.throughput_source})"),
    ]
    if tokens:
        rows.append((f"time for {tokens:,d} tokens", f"{plan_.seconds_for(tokens) / 60:.1f} min"))
    width = max(len(k) for k, _ in rows)
    head = f"estimate: {cfg.method.name} on {cfg.model.name}, batch {m.batch_size} x {m.seq_len} tokens, {m.dtype}"
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def train_tokens(cfg: RunConfig) -> int | None:
    """Tokens one run will train on, when the config says (max_steps, or a token cap)."""
    per_step = cfg.train.batch_size * cfg.train.grad_accum_steps * cfg.seq_len
    if cfg.train.max_steps:
        return cfg.train.max_steps * per_step
    if cfg.data.max_train_tokens:
        return int(cfg.data.max_train_tokens * cfg.train.epochs)
    return None


def preflight(cfg: RunConfig, model_config: Any, dtype: torch.dtype, force: bool) -> Plan:
    """Print the estimate before training; refuse (unless forced) a run that will not fit."""
    from peftlab.errors import FitError

    result = plan(
        cfg, model_config, loss="standard" if cfg.train.loss == "standard" else "chunked", dtype=dtype
    )
    m = result.memory
    print(
        f"estimate: peak {gib(m.total)} of {gib(result.capacity)} on {result.device} (weights {gib(m.weights)}, "
        f"optimizer {gib(m.optimizer_state)}, activations {gib(m.activations_used)}); "
        f"~{result.tokens_per_second:,.0f} tokens/s"
    )
    if not result.fits and not force:
        raise FitError(
            f"this run needs about {gib(m.total)} but {result.device} has {gib(result.capacity)}: "
            f"{result.advice}, or pass --force to try anyway"
        )
    return result


def must_release_memory(setting: bool | str, estimate: Plan | None) -> bool:
    """Whether a CPU run fixes glibc's malloc thresholds (cpu/malloc.py): always or never when the
    config says so; on auto only when glibc's retention would not fit (or nothing is estimated)."""
    if isinstance(setting, bool):
        return setting
    if estimate is None:  # a resumed run: no estimate was made, so be safe
        return True
    return estimate.memory.total * GLIBC_RETENTION > estimate.capacity
