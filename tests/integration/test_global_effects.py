"""Every process-wide change a run makes is undone: after a `train()` that raises mid-step, and after
two runs in one process (one with the speed-ups on, one with them off), transformers' attention
table, the modules' forwards and hooks, the SIGINT handler and the environment are as before, and
the second run's metrics say what was really in effect (docs/architecture.md lists the effects)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from conftest import build_tiny_llama
from peftlab.config.loading import validate_config
from peftlab.cpu import attention_blocks, onednn_linear
from peftlab.cpu.attention_blocks import causal_attention_in_blocks, causal_blocks_attention
from peftlab.cpu.malloc import has_glibc
from peftlab.cpu.onednn_linear import frozen_linears_on_onednn, matmul_nt
from peftlab.model.lean_mlp import lean_gated_mlps
from peftlab.model.structure import decoder_layers
from peftlab.train import recipe
from peftlab.train.callbacks import TALLY_KEY, GracefulInterrupt
from peftlab.train.recipe import train

needs_blocks = pytest.mark.skipif(
    attention_blocks.unavailable() is not None, reason=f"{attention_blocks.unavailable()}"
)
needs_onednn = pytest.mark.skipif(
    onednn_linear.unavailable() is not None, reason=f"{onednn_linear.unavailable()}"
)


def saved_tensor_hooks() -> Any:
    """The innermost saved-tensor hooks of this thread (None when none are active)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def process_state() -> dict[str, Any]:
    """What a run may change process-wide (or in this thread), as it is now."""
    return {
        "sdpa": ALL_ATTENTION_FUNCTIONS["sdpa"],
        "sdpa_overridden": "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping,
        "sigint": signal.getsignal(signal.SIGINT),
        "environ": dict(os.environ),
        "blocks_stack": list(attention_blocks._this_thread.stack),
        "blocks_active": attention_blocks._installed.active,
        "blocks_replaced": attention_blocks._installed.replaced,
        "onednn_depth": onednn_linear._this_thread.depth,
        "saved_tensor_hooks": saved_tensor_hooks(),
        "global_module_hooks": (len(_global_forward_pre_hooks), len(_global_forward_hooks)),
    }


def module_state(model: torch.nn.Module) -> dict[str, tuple[Any, ...]]:
    """Per module: its instance forward (if any) and the ids of its forward hooks."""
    return {
        name: (
            vars(m).get("forward"),
            tuple(m._forward_pre_hooks),
            tuple(m._forward_hooks),
            tuple(m._backward_hooks),
        )
        for name, m in model.named_modules()
    }


def assert_stock_table() -> None:
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert attention_blocks._installed.active == 0 and attention_blocks._installed.replaced is None


# ---------------------------------------------------------------------------------------------------
# train() that raises in the middle of a training step


CHAT = [
    {
        "conversation_id": f"c{i % 6}",
        "messages": [
            {"role": "prompter", "content": "Name a fox."},
            {"role": "assistant", "content": f"The quick brown fox {i}."},
        ],
    }
    for i in range(24)
]


@needs_blocks
@needs_onednn
@pytest.mark.parametrize("data", ["text", "chat"])
def test_a_run_that_raises_mid_step_leaves_everything_as_it_was(
    data: str, tiny_run_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """text: 256-token blocks, so attention goes in query blocks; chat: padded batches, so the
    padding tally's hook and collator tag are in place. Both: oneDNN, lean MLPs, recomputed norms,
    heap trims, the SIGINT handler. The run raises inside the second step's forward."""
    raw = tiny_run_config
    raw["eval"]["enabled"] = False
    raw["train"].update(max_steps=3, batch_size=1, heap_trim_layers=1)
    if data == "text":
        raw["data"]["block_size"] = 256
    else:
        path = tmp_path / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
        raw["data"] = {
            "kind": "chat",
            "train_path": str(path),
            "group_key": "conversation_id",
            "test_fraction": 0.34,
            "max_seq_len": 64,
        }
        raw["train"]["batch_size"] = 2
    cfg = validate_config(raw)

    seen: dict[str, Any] = {}
    armed = threading.Event()

    def bomb(module: torch.nn.Module, args: Any, output: Any) -> None:
        if armed.is_set():  # mid-forward of the second step: what is in effect now
            stack = attention_blocks._this_thread.stack
            seen["blocked_calls"] = stack[-1].calls if stack else None
            seen["sdpa"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
            seen["saved_tensor_hooks"] = saved_tensor_hooks()
            seen["onednn_depth"] = onednn_linear._this_thread.depth
            raise RuntimeError("bomb in the middle of step 2")

    real_train_model = recipe.train_model

    def train_model(run: Any, trainer: Any) -> Any:
        # The model as training gets it (transformers' own output-capturing hooks, installed at its
        # first forward, the loss check's, are in place by now), with a bomb on its last layer.
        layers = decoder_layers(trainer.model)
        assert layers is not None
        layers[-1].register_forward_hook(bomb)
        seen["model"], seen["prepared"] = trainer.model, module_state(trainer.model)
        return real_train_model(run, trainer)

    real_step = recipe.PeftlabTrainer.training_step
    steps: list[int] = []

    def training_step(self: Any, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        steps.append(len(steps) + 1)
        if len(steps) == 2:
            seen["step_modules"] = module_state(seen["model"])
            seen["sigint"] = signal.getsignal(signal.SIGINT)
            seen["collator"] = self.data_collator
            seen["tally_key"] = getattr(self.data_collator, "tally_key", None)
            armed.set()
        return real_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(recipe, "train_model", train_model)
    monkeypatch.setattr(recipe.PeftlabTrainer, "training_step", training_step)
    assert_stock_table()
    before = process_state()

    with pytest.raises(RuntimeError, match="bomb in the middle of step 2"):
        train(cfg, progress=False)

    # The speed-ups were really on when it raised.
    assert steps == [1, 2]
    model, prepared, inside = seen["model"], seen["prepared"], seen["step_modules"]
    swapped = [name for name, state in inside.items() if state[0] is not None]
    assert len(swapped) == (2 * 7 + 1) + 2  # frozen linears on oneDNN (as end to end) + 2 lean MLPs
    assert any(inside[n][2] != prepared[n][2] for n in inside)  # heap-trim and norm hooks
    assert seen["onednn_depth"] == 1 and seen["saved_tensor_hooks"] is not None
    handler = seen["sigint"]
    assert isinstance(getattr(handler, "__self__", None), GracefulInterrupt)
    if data == "text":
        assert seen["sdpa"] is causal_blocks_attention
        assert seen["blocked_calls"] == 2 + 2  # 2 layers in step 1, both layers of step 2 so far
    else:
        assert seen["tally_key"] == TALLY_KEY
        assert len(inside[""][1]) == len(prepared[""][1]) + 1  # the padding tally's pre-hook

    # ... and all of it is undone.
    assert process_state() == before
    assert module_state(model) == prepared
    assert not any("forward" in vars(m) for m in model.modules())
    assert_stock_table()
    if data == "chat":
        assert seen["collator"].tally_key is None  # batches built from now on go untagged

    run = Path(raw["output"]["dir"]) / "tiny"
    manifest = json.loads((run / "manifest.json").read_text())
    assert (
        manifest["status"] == "failed" and manifest["error"] == "RuntimeError: bomb in the middle of step 2"
    )
    assert not (run / "metrics.json").exists()


# ---------------------------------------------------------------------------------------------------
# two runs in one process: speed-ups on, then off

# Runs `peftlab train` twice in a fresh process (glibc's malloc thresholds, once fixed, stay fixed
# for the process, so this must not run in pytest's). The kernels are counted through spies put in
# place inside the command, after it set THP_MEM_ALLOC_ENABLE, as the command imports torch itself.
TWO_RUNS = """
import contextlib, json, os, signal, sys

report_path, config_path, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
env_before, sigint_before = dict(os.environ), signal.getsignal(signal.SIGINT)

from peftlab import cli
from peftlab.cpu import huge_pages

report = {"torch_imported_early": "torch" in sys.modules, "runs": []}
kernels = {"blocked": 0, "onednn": 0}


def install_spies():
    from peftlab.cpu import attention_blocks, onednn_linear

    if kernels.get("spied"):
        return
    kernels["spied"] = True
    apply = attention_blocks._CausalBlocks.apply

    def counted_apply(*args):
        kernels["blocked"] += 1
        return apply(*args)

    attention_blocks._CausalBlocks.apply = counted_apply
    kernel = onednn_linear._linear_pointwise()
    if kernel is not None:
        def counted_kernel(*args):
            kernels["onednn"] += 1
            return kernel(*args)

        onednn_linear._linear_pointwise = lambda: counted_kernel


real_command = huge_pages.for_this_command


@contextlib.contextmanager
def command_with_spies():
    with real_command() as set_here:
        install_spies()
        yield set_here


huge_pages.for_this_command = command_with_spies


def state():
    import torch
    from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from peftlab.cpu import attention_blocks, onednn_linear

    keys = env_before.keys() | os.environ.keys()
    return {
        "environ_changed": sorted(k for k in keys if env_before.get(k) != os.environ.get(k)),
        "sigint_kept": signal.getsignal(signal.SIGINT) is sigint_before,
        "sdpa_is_stock": ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward,
        "sdpa_overridden": "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping,
        "blocks_stack": len(attention_blocks._this_thread.stack),
        "blocks_active": attention_blocks._installed.active,
        "blocks_replaced": repr(attention_blocks._installed.replaced),
        "onednn_depth": onednn_linear._this_thread.depth,
        "saved_tensor_hooks": repr(torch._C._autograd._top_saved_tensors_default_hooks(False)),
        "global_module_hooks": [len(_global_forward_pre_hooks), len(_global_forward_hooks)],
    }


for name, overrides in runs:
    start = dict(kernels)
    code = cli.main(["train", config_path, f"output.name={name}", *overrides, "--quiet"])
    from peftlab.cpu import malloc

    report["runs"].append(
        {
            "code": code,
            "blocked_calls": kernels["blocked"] - start["blocked"],
            "onednn_calls": kernels["onednn"] - start["onednn"],
            "malloc_fixed": malloc.memory_released(),
            "after": state(),
        }
    )
with open(report_path, "w") as handle:
    json.dump(report, handle)
"""

STOCK_STATE = {
    "environ_changed": [],
    "sigint_kept": True,
    "sdpa_is_stock": True,
    "sdpa_overridden": False,
    "blocks_stack": 0,
    "blocks_active": 0,
    "blocks_replaced": "None",
    "onednn_depth": 0,
    "saved_tensor_hooks": "None",
    "global_module_hooks": [0, 0],
}


@needs_blocks
@needs_onednn
@pytest.mark.skipif(not has_glibc(), reason="checks glibc's malloc thresholds (fixed for good by mallopt)")
def test_two_runs_in_one_process_restore_everything_and_report_what_was_in_effect(
    tiny_run_config: dict, tmp_path: Path
) -> None:
    raw = tiny_run_config
    raw["data"]["block_size"] = 256
    raw["eval"]["enabled"] = False
    raw["train"].update(max_steps=2, batch_size=1)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    script, report_path = tmp_path / "two_runs.py", tmp_path / "report.json"
    script.write_text(TWO_RUNS)
    switches = ("onednn_forward", "causal_attention_blocks", "release_memory")
    runs: list[tuple[str, list[str]]] = [
        ("speedups-on", [f"train.{name}=true" for name in switches]),
        ("speedups-off", [f"train.{name}=false" for name in switches]),
    ]
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}  # the command sets it
    child = subprocess.run(
        [sys.executable, str(script), str(report_path), str(config), json.dumps(runs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["torch_imported_early"] is False  # so the first command sets THP_MEM_ALLOC_ENABLE
    first, second = report["runs"]
    assert first["code"] == second["code"] == 0, child.stderr[-3000:]

    # After each run: the table, thread-local switches, hooks, SIGINT and environment as they were.
    assert first["after"] == STOCK_STATE
    assert second["after"] == STOCK_STATE

    folder = Path(raw["output"]["dir"])
    on_metrics, off_metrics = (json.loads((folder / name / "metrics.json").read_text()) for name, _ in runs)
    on_manifest, off_manifest = (
        json.loads((folder / name / "manifest.json").read_text()) for name, _ in runs
    )

    # The first run: on, and the kernels it names really ran.
    assert on_metrics["speedups"]["onednn_forward"] == "on"
    assert on_metrics["speedups"]["causal_attention_blocks"] == "on"
    assert on_metrics["onednn_linear_layers"] == 2 * 7 + 1 and first["onednn_calls"] > 0
    held_out = on_manifest["data"]["validation_blocks"]
    assert on_metrics["attention_calls_in_blocks"] == first["blocked_calls"] == 2 * (2 + held_out)
    assert on_metrics["release_memory"] is True and on_manifest["process"]["malloc_thresholds_fixed"] is True
    # the command set THP_MEM_ALLOC_ENABLE for its run (and `environ_changed` above says it is gone)
    assert on_manifest["process"]["huge_pages"] == {"THP_MEM_ALLOC_ENABLE": "1", "set_by": "peftlab command"}

    # The second run: off, and no blocked attention or oneDNN kernel ran ...
    assert off_metrics["speedups"]["onednn_forward"] == "off: not asked"
    assert off_metrics["speedups"]["causal_attention_blocks"] == "off: not asked"
    assert off_metrics["onednn_linear_layers"] == 0 and second["onednn_calls"] == 0
    assert off_metrics["attention_calls_in_blocks"] == 0 and second["blocked_calls"] == 0
    assert off_metrics["train_steps"] == 2 and off_metrics["final_eval_loss"] > 0
    # ... but the malloc thresholds the first run fixed were in effect, though not asked for.
    assert second["malloc_fixed"] is True
    assert off_metrics["release_memory"] is True
    assert off_manifest["process"]["malloc_thresholds_fixed"] is True
    # and so was the huge-page allocation torch read in the first command, though the variable is gone
    assert off_manifest["process"]["huge_pages"] == {"THP_MEM_ALLOC_ENABLE": "1", "set_by": "peftlab command"}


# ---------------------------------------------------------------------------------------------------
# blocks entered and left from two threads


class Worker(threading.Thread):
    """A thread that runs what it is given, one thing at a time, when the test says: the order of
    the two threads' steps is the test's, not the scheduler's."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.inbox: queue.Queue[Callable[[], Any] | None] = queue.Queue()
        self.outbox: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self.blocks: list[contextlib.ExitStack] = []  # this thread's open blocks, innermost last
        self.start()

    def run(self) -> None:
        while (task := self.inbox.get()) is not None:
            try:
                self.outbox.put((True, task()))
            except BaseException as exc:  # handed to the test's thread
                self.outbox.put((False, exc))

    def do(self, task: Callable[[], Any]) -> Any:
        self.inbox.put(task)
        ok, value = self.outbox.get(timeout=60)
        if not ok:
            raise value
        return value

    def enter(self, switch: Callable[[], contextlib.AbstractContextManager[Any]]) -> Any:
        def task() -> Any:
            stack = contextlib.ExitStack()
            value = stack.enter_context(switch())
            self.blocks.append(stack)
            return value

        return self.do(task)

    def leave(self) -> None:
        self.do(lambda: self.blocks.pop().close())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            while self.blocks:
                self.leave()
        self.inbox.put(None)
        self.join(timeout=60)


@contextlib.contextmanager
def workers(*names: str) -> Iterator[list[Worker]]:
    started = [Worker(name) for name in names]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


class _Attention(torch.nn.Module):
    is_causal = True


ATTENTION = _Attention()


def qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 256-token causal self-attention's inputs (1 x 2 heads x 256 x 8): what blocks cover."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, 256, 8, generator=g) for _ in range(3))  # type: ignore[return-value]


def attend(mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = qkv()
    return causal_blocks_attention(ATTENTION, q, k, v, mask, is_causal=True)[0]


def stock(mask: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = qkv()
    return sdpa_attention_forward(ATTENTION, q, k, v, mask, is_causal=True)[0]


def causal_mask() -> torch.Tensor:
    """(1, 1, 256, 256) additive causal mask: a masked call, which blocks hand to stock SDPA."""
    return torch.full((256, 256), float("-inf")).triu(1)[None, None]


@needs_blocks
@pytest.mark.parametrize("order", ["A in, B in, A out, B out", "A in, B in, B out, A out"])
def test_blocks_overlapping_across_threads_count_their_own_calls_and_restore_the_table(order: str) -> None:
    assert_stock_table()
    blocks = lambda: causal_attention_in_blocks(True)  # noqa: E731
    with workers("A", "B") as (a, b):
        tally_a = a.enter(blocks)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is causal_blocks_attention
        # A has blocks on, B does not: B's call goes to stock SDPA, counted in no tally; A's counts in A's.
        assert torch.equal(b.do(attend), stock())
        assert tally_a.calls == 0
        torch.testing.assert_close(a.do(attend), stock())
        assert tally_a.calls == 1

        tally_b = b.enter(blocks)
        assert attention_blocks._installed.active == 2
        assert attention_blocks._installed.replaced is sdpa_attention_forward  # not the block function
        b.do(attend)
        assert (tally_a.calls, tally_b.calls) == (1, 1)

        if order.index("A out") < order.index("B out"):
            (first, first_tally), (last, last_tally) = (a, tally_a), (b, tally_b)
        else:
            (first, first_tally), (last, last_tally) = (b, tally_b), (a, tally_a)
        first.leave()
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is causal_blocks_attention  # the other block is still on
        assert attention_blocks._installed.active == 1
        assert torch.equal(first.do(attend), stock())  # the thread that left: stock, uncounted
        assert (first_tally.calls, last_tally.calls) == (1, 1)
        last.do(attend)  # the thread still in blocks: counted in its own tally
        assert (first_tally.calls, last_tally.calls) == (1, 2)

        last.leave()
        assert_stock_table()
        assert a.do(lambda: list(attention_blocks._this_thread.stack)) == []
        assert b.do(lambda: list(attention_blocks._this_thread.stack)) == []
        assert torch.equal(a.do(attend), stock()) and torch.equal(b.do(attend), stock())
    assert_stock_table()


@needs_blocks
def test_a_masked_call_in_nested_or_overlapping_blocks_goes_to_stock_sdpa_without_recursing() -> None:
    """The second block in must keep transformers' function as the fallback, not the block function
    the first one installed (which would call itself for every call it does not cover)."""
    mask = causal_mask()
    expected = stock(mask)
    blocks = lambda: causal_attention_in_blocks(True)  # noqa: E731
    with workers("A", "B") as (a, b):
        tally_a = a.enter(blocks)
        tally_b = b.enter(blocks)  # overlapping, another thread
        assert torch.equal(b.do(lambda: attend(mask)), expected)
        inner = a.enter(blocks)  # nested, the same thread
        assert torch.equal(a.do(lambda: attend(mask)), expected)
        a.do(attend)
        assert (tally_a.calls, tally_b.calls, inner.calls) == (0, 0, 1)  # the innermost block counts
        a.leave()  # the outer block of A stays
        a.do(attend)
        assert (tally_a.calls, inner.calls) == (1, 1)
        a.leave()  # A out first, B still in
        assert torch.equal(b.do(lambda: attend(mask)), expected)
        b.leave()
    assert_stock_table()


# ---------------------------------------------------------------------------------------------------
# the other switches, when the block raises (what tests/unit does not cover already)


def test_the_interrupt_handler_comes_back_when_training_raises() -> None:
    received: list[int] = []

    def theirs(signum: int, frame: Any) -> None:  # whatever handled Ctrl-C before training
        received.append(signum)

    previous = signal.signal(signal.SIGINT, theirs)
    try:
        interrupt = GracefulInterrupt()
        with pytest.raises(RuntimeError, match="stop"), interrupt.installed() as on:
            assert on and signal.getsignal(signal.SIGINT) == interrupt._handle
            signal.raise_signal(signal.SIGINT)  # Ctrl-C during training: a graceful stop is asked
            assert interrupt.requested and received == []
            raise RuntimeError("stop")
        assert signal.getsignal(signal.SIGINT) is theirs
        signal.raise_signal(signal.SIGINT)  # after training, Ctrl-C is theirs again
        assert received == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_interrupt_handler_is_left_alone_outside_the_main_thread() -> None:
    before = signal.getsignal(signal.SIGINT)

    def train_in_a_thread() -> tuple[bool, Any]:
        with GracefulInterrupt().installed() as on:
            return on, signal.getsignal(signal.SIGINT)

    with workers("trainer") as (worker,):
        on, handler = worker.do(train_in_a_thread)
    # Python lets only the main thread set a handler: training goes on without one
    assert on is False and handler is before
    assert signal.getsignal(signal.SIGINT) is before


@needs_onednn
def test_matmul_nt_stays_on_mkl_in_a_thread_that_did_not_switch_on(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = onednn_linear._linear_pointwise()
    calls: list[str] = []

    def spy(*args: Any) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        return kernel(*args)  # type: ignore[misc]

    monkeypatch.setattr(onednn_linear, "_linear_pointwise", lambda: spy)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 16, generator=g), torch.randn(7, 16, generator=g)
    with workers("switched") as (worker,):
        assert worker.enter(lambda: frozen_linears_on_onednn(torch.nn.Linear(2, 2))) == 0
        assert worker.do(lambda: onednn_linear._this_thread.depth) == 1
        assert onednn_linear._this_thread.depth == 0
        assert torch.equal(matmul_nt(x, w), x @ w.T)  # this thread: MKL, bit for bit
        assert calls == []
        torch.testing.assert_close(worker.do(lambda: matmul_nt(x, w)), x @ w.T, rtol=1e-5, atol=1e-5)
        assert calls == ["switched"]
        worker.leave()
        assert worker.do(lambda: onednn_linear._this_thread.depth) == 0
        worker.do(lambda: matmul_nt(x, w))
        assert calls == ["switched"]


def test_lean_mlp_forwards_come_back_when_the_block_raises(tiny_tokenizer: Any) -> None:
    model = build_tiny_llama(len(tiny_tokenizer))
    mlps = [layer.mlp for layer in model.model.layers]
    ids = torch.randint(3, len(tiny_tokenizer), (1, 8), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits

    def theirs(x: torch.Tensor) -> torch.Tensor:  # a patch someone made meanwhile
        return x

    with pytest.raises(RuntimeError, match="stop"), lean_gated_mlps(model) as switched:
        assert switched == 2 and all("forward" in vars(mlp) for mlp in mlps)
        assert torch.equal(model(input_ids=ids).logits, expected)
        mlps[1].forward = theirs
        raise RuntimeError("stop")
    assert "forward" not in vars(mlps[0])
    assert mlps[1].forward is theirs  # not this switch's any more: left as it is
    del mlps[1].forward
    assert torch.equal(model(input_ids=ids).logits, expected)
