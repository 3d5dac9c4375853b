"""Shared fixtures: a tiny llama and a tiny tokenizer built offline, plus tiny text data.

No test here touches the network or the real model; tests marked `slow` (tests/slow/) do use the
embedded SmolLM2 and the real data in ../shared/data.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

if TYPE_CHECKING:
    from peftlab.model.norm_recompute import NormRecompute

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model learns tiny things from tiny text.",
    "Valkyria Chronicles is a tactical role-playing game.",
    "The cat sat on the mat and the dog sat on the log.",
    "Numbers like 1 2 3 4 5 6 7 8 9 10 appear in text.",
    " = Robert Boulter = \n Robert Boulter is an English film and television actor .",
] * 20

TRAIN_TEXT = (
    " = First Article = \n The quick brown fox jumps over the lazy dog . The cat sat on the mat .\n\n"
    " = = A section = = \n A tiny model learns tiny things from tiny text . The dog sat on the log .\n"
    " = Second Article = \n Valkyria Chronicles is a tactical role-playing game . Numbers like 1 2 3 appear .\n"
) * 6
EVAL_TEXT = " = Held Out = \n The brown dog sat on the lazy cat . A tiny text about a tiny fox .\n" * 4


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """hidden_size=64 gives layers that bitsandbytes' 4-bit blocks (64 values) can quantise."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def prepared_tiny_model(vocab: int, method: dict[str, Any]) -> torch.nn.Module:
    """A tiny llama (hidden 64) with `method` applied, in train mode."""
    from peftlab.config.loading import validate_config
    from peftlab.methods import get_method

    cfg = validate_config({"data": {"train_path": "unused"}, "method": method})
    return get_method(method["name"]).prepare(build_tiny_llama(vocab, hidden_size=64), cfg.method).train()


def loss_and_grads(model: torch.nn.Module, **inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward from zeroed gradients: the loss and every parameter's gradient
    (only the parameters that got one: frozen weights get none)."""
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def saved_activation_bytes(
    model: torch.nn.Module, recompute: NormRecompute | None = None, **inputs: object
) -> int:
    """Distinct non-parameter bytes autograd keeps for backward in one forward of `model`; with a
    recompute.NormRecompute, what its hooks keep (the only saved-tensor hooks that run)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    params = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    seen: dict[StorageWeakRef, int] = {}

    def pack(t: torch.Tensor) -> object:
        if recompute is None:
            packed: object = t
            held = t
        else:
            packed = recompute.pack(t)
            held = recompute.held(packed)
        ref = StorageWeakRef(held.untyped_storage())
        if ref not in params:
            seen[ref] = held.untyped_storage().nbytes()
        return packed

    unpack = recompute.unpack if recompute is not None else (lambda t: t)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        model(**inputs)
    return sum(seen.values())


@pytest.fixture(autouse=True)
def _private_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Fast tests get their own $PEFTLAB_CACHE (tokenised data, base evaluations), so a result cached
    by an earlier session can never stand in for one this code computes. Slow tests get theirs from
    tests/slow/slow_cache.py (an empty cache per test, the converted SmolLM2 shared per session)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch = request.getfixturevalue("monkeypatch")
        monkeypatch.setenv("PEFTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state (python, numpy, torch), so a draw a test makes
    without its own generator is the same on every run and every machine."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture()
def tiny_model(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_tiny_llama(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast) -> Path:
    """A local model folder (config.json, model.safetensors, tokenizer) as a user would have."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(tiny_tokenizer)).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def text_files(tmp_path: Path) -> tuple[Path, Path]:
    train, held_out = tmp_path / "train.raw", tmp_path / "test.raw"
    train.write_text(TRAIN_TEXT, encoding="utf-8")
    held_out.write_text(EVAL_TEXT, encoding="utf-8")
    return train, held_out


@pytest.fixture()
def tiny_run_config(tiny_model_dir: Path, text_files: tuple[Path, Path], tmp_path: Path) -> dict:
    """A raw config dict that trains LoRA on the tiny model in a second or two."""
    train, held_out = text_files
    return {
        "model": {"name": str(tiny_model_dir), "device": "cpu", "dtype": "float32"},
        "data": {"train_path": str(train), "eval_path": str(held_out), "block_size": 32},
        "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        # release_memory false: glibc's thresholds are process-wide for good, and this is pytest's process
        "train": {"max_steps": 6, "batch_size": 2, "lr": 5e-3, "seed": 0, "release_memory": False},
        "eval": {
            "window": 16,
            "stride": 8,
            "batch_size": 2,
            # the evaluation defaults (4,096 forgetting tokens, ten prompts x 64 new tokens) take
            # ~30 s on the tiny model; tests that need them set them
            "forgetting_max_tokens": 256,
            "sample_prompts": ["Name a fox.", "What did the cat sit on?"],
            "max_new_tokens": 8,
        },
        "output": {"dir": str(tmp_path / "runs"), "name": "tiny"},
    }
