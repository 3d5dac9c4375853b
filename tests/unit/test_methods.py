import pytest
import torch

from peftlab.config.loading import validate_config
from peftlab.errors import ConfigError, MethodError
from peftlab.methods import get_method, method_names
from peftlab.model.structure import count_parameters


def cfg_for(method: dict):
    return validate_config({"data": {"train_path": "x"}, "method": method}).method


def test_registry_lists_methods_and_rejects_unknown_and_duplicates():
    assert {"full", "lora"} <= set(method_names())
    with pytest.raises(ConfigError, match=r"registered methods: .*lora"):
        get_method("lorra")
    from peftlab.methods.registry import register_method

    with pytest.raises(ValueError, match="already registered"):
        register_method(get_method("lora"))


def test_lora_changes_adapters_and_leaves_every_base_weight_bitwise_unchanged(tiny_model):
    before = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    model = get_method("lora").prepare(
        tiny_model, cfg_for({"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    )
    adapters_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters_before, "LoRA must create trainable adapter weights"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 300, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    for name, old in before.items():
        peft_name = next(
            n for n in after if n.endswith(name.replace(".weight", ".base_layer.weight")) or n.endswith(name)
        )
        assert torch.equal(after[peft_name].detach(), old), f"base weight {name} changed"
        assert not after[peft_name].requires_grad
    changed = [n for n, old in adapters_before.items() if not torch.equal(after[n].detach(), old)]
    assert sorted(changed) == sorted(adapters_before), "every adapter tensor must change"


def test_lora_trainable_count_matches_formula_and_peft(tiny_model):
    model = get_method("lora").prepare(
        tiny_model, cfg_for({"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]})
    )
    cfg = tiny_model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q = 4 * (cfg.hidden_size + cfg.num_attention_heads * head_dim)
    v = 4 * (cfg.hidden_size + cfg.num_key_value_heads * head_dim)
    counts = count_parameters(model)
    assert counts.trainable == cfg.num_hidden_layers * (q + v)
    assert (counts.trainable, counts.total) == tuple(model.get_nb_trainable_parameters())
    assert counts.line().startswith(
        f"trainable params: {counts.trainable:,d} || all params: {counts.total:,d} || trainable%: "
    )


def test_lora_target_that_matches_nothing_lists_module_names(tiny_model):
    with pytest.raises(MethodError, match=r"\['qkv'\] match no module; linear modules: .*q_proj"):
        get_method("lora").prepare(tiny_model, cfg_for({"name": "lora", "target_modules": ["qkv"]}))


def test_full_trains_everything(tiny_model):
    tiny_model.requires_grad_(False)
    model = get_method("full").prepare(tiny_model, cfg_for({"name": "full"}))
    counts = count_parameters(model)
    assert counts.trainable == counts.total == sum(p.numel() for p in tiny_model.parameters())


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ({"name": "lora", "alpha": 0}, "method.alpha: Input should be greater than 0"),
        ({"name": "dora", "dropout": -0.1}, "method.dropout: Input should be greater than or equal to 0"),
        ({"name": "qlora", "quant_type": "int3"}, "method.quant_type: Input should be 'nf4' or 'fp4'"),
        ({"name": "galore", "rank": 0}, "method.rank: Input should be greater than 0"),
        ({"name": "freeze", "last_layers": 0}, "freeze trains nothing"),
        (
            {"name": "prompt_tuning", "num_virtual_tokens": 0},
            "method.num_virtual_tokens: Input should be greater than 0",
        ),
        ({"name": "qlora", "init": "loftq"}, "for LoftQ use method lora with init=loftq"),
    ],
)
def test_bad_method_settings_fail_in_the_config(method, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        cfg_for(method)


def test_galore_rank_larger_than_a_layer_is_rejected(tiny_model):
    with pytest.raises(
        MethodError, match=r"galore.rank=64 is larger than layer .*k_proj \(16x32\); use rank <= 16"
    ):
        get_method("galore").prepare(
            tiny_model, cfg_for({"name": "galore", "rank": 64, "target_modules": ["k_proj"]})
        )


def test_qlora_without_bitsandbytes_says_how_to_install(monkeypatch, tiny_model):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(MethodError, match=r"qlora needs bitsandbytes: pip install 'peftlab\[quant\]'"):
        get_method("qlora").load_options(cfg_for({"name": "qlora"}), torch.float32)


def test_full_8bit_adamw_and_galore_use_transformers_optimizers():
    assert get_method("full").trainer_options(cfg_for({"name": "full", "optimizer": "adamw_8bit"})) == {
        "optim": "adamw_bnb_8bit"
    }
    options = get_method("galore").trainer_options(cfg_for({"name": "galore", "rank": 8, "layerwise": True}))
    assert options["optim"] == "galore_adamw_layerwise"
    assert options["optim_args"] == "rank=8,update_proj_gap=200,scale=0.25,proj_type=std"


def test_prefix_tuning_starts_as_the_base_model_reading_the_prefill_tokens(tiny_model):
    """init=model: the prefix is the base model's own keys/values over fixed ids, so the prefix-tuned
    model's logits on x equal the base model's logits on (ids + x) at x's positions."""
    from peftlab.methods.prompt_tuning import prefill_ids

    model = get_method("prefix_tuning").prepare(
        tiny_model, cfg_for({"name": "prefix_tuning", "num_virtual_tokens": 4})
    )
    model.eval()
    torch.manual_seed(0)
    x = torch.randint(3, tiny_model.config.vocab_size, (2, 10))
    ids = prefill_ids(tiny_model.config, 4).expand(2, -1)
    with torch.no_grad():
        tuned = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        with model.disable_adapter():
            reading = model(input_ids=torch.cat([ids, x], dim=1)).logits[:, 4:]
            plain = model(input_ids=x).logits
    torch.testing.assert_close(tuned, reading, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-3)  # the prefix does change the output


def test_prefix_tuning_random_init_is_peft_default(tiny_model):
    model = get_method("prefix_tuning").prepare(
        tiny_model, cfg_for({"name": "prefix_tuning", "num_virtual_tokens": 4, "init": "random"})
    )
    weight = model.prompt_encoder["default"].embedding.weight
    assert 0.8 < float(weight.std()) < 1.2  # peft's nn.Embedding N(0, 1), not the model's scale


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_data_dependent_inits_dry_run_on_meta_with_the_real_counts(tiny_model, init):
    """The estimate prepares the method on a meta model (no weights): pissa/olora, which compute the
    adapters from the weights, fall back to the default init there with identical shapes."""
    from transformers import AutoModelForCausalLM

    cfg = cfg_for({"name": "lora", "r": 4, "init": init})
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_model.config)
    on_meta = count_parameters(get_method("lora").prepare(meta, cfg))
    real = count_parameters(get_method("lora").prepare(tiny_model, cfg))
    assert (on_meta.trainable, on_meta.total) == (real.trainable, real.total)


def test_loftq_without_cuda_fails_with_one_clear_line(tiny_model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodError, match="init=loftq needs a CUDA GPU"):
        get_method("lora").prepare(tiny_model, cfg_for({"name": "lora", "init": "loftq"}))
