"""model/lean_mlp.py: the silu-gated MLP that saves two activations instead of three computes the same
values and gradients bit for bit, saves exactly one (tokens x intermediate) tensor less per layer, and leaves
MLPs it does not recognise alone."""

from __future__ import annotations

import torch
from transformers import AutoConfig, GemmaConfig, GemmaForCausalLM

from peftlab.config.loading import validate_config
from peftlab.methods import get_method
from peftlab.model.lean_mlp import SiluMul, lean_gated_mlps
from peftlab.sizing.estimate import estimate_memory


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    from conftest import saved_activation_bytes

    return saved_activation_bytes(model, input_ids=ids, logits_to_keep=1)


def lora(model: torch.nn.Module) -> torch.nn.Module:
    cfg = validate_config(
        {"data": {"train_path": "unused"}, "method": {"name": "lora", "r": 4, "target_modules": "all-linear"}}
    )
    return get_method("lora").prepare(model, cfg.method).train()


def test_silu_mul_matches_autograd_in_float64():
    gate = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    assert torch.equal(SiluMul.apply(gate, up), torch.nn.functional.silu(gate) * up)


def test_switched_model_gives_the_same_logits_and_gradients_and_saves_less(tiny_tokenizer):
    from conftest import build_tiny_llama

    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    stock = lora(build_tiny_llama(len(tiny_tokenizer), hidden_size=64))
    lean = lora(build_tiny_llama(len(tiny_tokenizer), hidden_size=64))
    before = saved_bytes(lean, ids)
    with lean_gated_mlps(lean) as switched:
        assert switched == 2  # the tiny llama's two layers
        stock_out, lean_out = stock(input_ids=ids, labels=ids), lean(input_ids=ids, labels=ids)
        assert torch.equal(stock_out.logits, lean_out.logits)
        stock_out.loss.backward()
        lean_out.loss.backward()
        # one silu(gate) output of (2 x 16 tokens) x 128 intermediate fp32 values per layer
        assert before - saved_bytes(lean, ids) == 2 * (2 * 16 * 128 * 4)
    pairs = [(a, b) for a, b in zip(stock.parameters(), lean.parameters(), strict=True) if a.requires_grad]
    assert pairs
    for a, b in pairs:
        assert torch.equal(a.grad, b.grad)
    # the stock forwards are back after the block
    assert not any("forward" in vars(m) for m in lean.modules())
    assert saved_bytes(lean, ids) == before


def test_mlps_it_does_not_recognise_are_left_alone(tiny_tokenizer):
    from conftest import build_tiny_llama

    gelu = GemmaForCausalLM(  # GELU-gated: not the silu product
        GemmaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        )
    )  # fmt: skip
    with lean_gated_mlps(gelu) as switched:
        assert switched == 0

    model = build_tiny_llama(len(tiny_tokenizer))
    mlp = model.model.layers[0].mlp

    class ScaledMLP(type(mlp)):  # type: ignore[misc]
        def forward(self, x):
            return 2 * self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    mlp.__class__ = ScaledMLP
    with lean_gated_mlps(model) as switched:
        assert switched == 1  # only the second layer's stock MLP
        assert "forward" not in vars(mlp)


def test_the_estimate_traces_the_lean_mlp(tiny_tokenizer, tmp_path):
    """The estimator counts what the run saves: one silu output per layer less with lean_mlp."""
    from conftest import build_tiny_llama

    build_tiny_llama(len(tiny_tokenizer), hidden_size=64).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)

    def activations(lean_mlp: bool) -> int:
        cfg = validate_config(
            {
                "model": {"name": str(tmp_path)},
                "data": {"train_path": "unused", "block_size": 16},
                "method": {"name": "lora", "r": 4},
                "train": {"batch_size": 2, "lean_mlp": lean_mlp},
            }
        )
        return estimate_memory(cfg, config, torch.float32, 0).activations

    assert activations(False) - activations(True) == 2 * (2 * 16 * 128 * 4)
