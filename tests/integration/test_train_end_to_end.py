import json

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peftlab.cli import main
from peftlab.config.loading import load_config, validate_config
from peftlab.cpu.malloc import _glibc
from peftlab.train.recipe import train


def test_train_writes_a_complete_run_folder(tiny_run_config, tiny_model_dir, capsys):
    tiny_run_config["train"]["heap_trim_layers"] = 1  # glibc's free heap back after each of the 2 layers
    result = train(validate_config(tiny_run_config), progress=False)
    run = result.run_dir
    out = capsys.readouterr().out
    assert "trainable params: 896 || all params: " in out

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["device"] == "cpu" and manifest["dtype"] == "float32"
    assert manifest["packages"]["torch"] and manifest["model"]["fingerprint"]
    assert manifest["finished_at"] >= manifest["started_at"]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == 2 * (4 * (32 + 32) + 4 * (32 + 16))  # 2 layers x (q + v) adapters
    assert metrics["train_steps"] == 6
    for side in ("base", "tuned"):
        assert metrics[side]["window"] == 16 and metrics[side]["stride"] == 8
        assert metrics[side]["tokens"] > 0 and 0 <= metrics[side]["token_accuracy"] <= 1
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    assert metrics["tokens_per_second"] > 0 and metrics["memory"]["peak_rss_bytes"] > 0
    assert metrics["heap_trims_per_forward"] == (2 if _glibc() is not None else 0)
    # layer 1's input norm output, rebuilt once a step (layer 0's input, the embeddings, needs no grad)
    assert metrics["norm_outputs_recomputed"] == 6
    assert metrics["attention_calls_in_blocks"] == 0  # 32-token blocks: too short to gain from blocks
    # frozen linears on oneDNN: 2 layers x (q, k, v, o base layers, gate, up, down) + the tied lm_head
    assert metrics["onednn_linear_layers"] == 2 * 7 + 1
    assert metrics["speedups"] == {
        "lean_mlp": "on",
        "recompute_norms": "on",
        "heap_trim": "on" if _glibc() is not None else "off: no glibc malloc in this process",
        "causal_attention_blocks": "on",  # on, though these shapes never use the blocks (0 calls)
        "onednn_forward": "on",
    }
    assert metrics["lean_mlps"] == 2
    assert metrics["release_memory"] == manifest["process"]["malloc_thresholds_fixed"]

    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    log = [r for r in lines if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    # no checkpoints: the validation loss (last training blocks held out) is taken at the epoch end
    evals = [r for r in lines if "eval_loss" in r]
    assert [r["step"] for r in evals] == [6] and evals[0]["eval_loss"] == metrics["final_eval_loss"] > 0
    assert (
        manifest["data"]["validation_blocks"] >= 1
        and "training blocks" in manifest["data"]["validation_source"]
    )
    assert all(r["loss"] > 0 and r["lr"] is not None and r["tokens_per_second"] > 0 for r in log)
    assert log[-1]["tokens_seen"] == 6 * 2 * 32
    assert (run / "plots" / "loss.png").stat().st_size > 1000

    # The adapter loads with plain peft and reproduces the trained model's logits.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(torch.count_nonzero(t) for name, t in adapter.items() if "lora_B" in name)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    assert not torch.allclose(loaded(ids).logits, plain(ids).logits), "adapter must change the output"


def test_a_cpu_run_at_256_tokens_computes_attention_in_blocks(tiny_run_config):
    """cpu/attention_blocks.py on the training path: every training forward's attention goes in blocks."""
    tiny_run_config["data"]["block_size"] = 256
    tiny_run_config["train"].update(max_steps=2, batch_size=1)
    tiny_run_config["eval"]["enabled"] = False
    result = train(validate_config(tiny_run_config), progress=False)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    held_out = json.loads((result.run_dir / "manifest.json").read_text())["data"]["validation_blocks"]
    # 2 layers x (2 training steps + the end-of-epoch validation pass, one block a batch)
    assert metrics["attention_calls_in_blocks"] == 2 * (2 + held_out)
    assert metrics["train_steps"] == 2 and metrics["final_eval_loss"] > 0


def test_saved_config_reproduces_the_run_bitwise(tiny_run_config):
    first = train(validate_config(tiny_run_config), progress=False).run_dir
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["method"]["name"] == "lora" and saved["method"]["r"] == 4
    second = train(
        load_config(first / "config.yaml", ["output.name=again", "eval.enabled=false"]), progress=False
    ).run_dir
    a = load_file(first / "adapter" / "adapter_model.safetensors")
    b = load_file(second / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_method_saves_a_whole_model(tiny_run_config):
    tiny_run_config["method"] = {"name": "full"}
    tiny_run_config["train"]["lr"] = 1e-3
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert sum(p.numel() for p in model.parameters()) > 10_000
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["trainable_params"] == metrics["total_params"]


def test_same_run_name_never_overwrites(tiny_run_config):
    tiny_run_config["eval"]["enabled"] = False
    first = train(validate_config(tiny_run_config), progress=False).run_dir
    second = train(validate_config(tiny_run_config), progress=False).run_dir
    assert first != second and second.name == "tiny-1"
    assert (first / "manifest.json").is_file() and (second / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.rank=8", "unknown config key 'method.rank' (did you mean 'method.r'?)"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("data.train_path=/no/such/file.txt", "data file or folder not found: /no/such/file.txt"),
        ("model.name=/no/such/model", "is neither a built-in alias"),
        ("method.target_modules=[nope]", "match no module; linear modules:"),
        ("data.block_size=100000", "data.block_size=100000 is over the model's limit of 256 positions"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tiny_run_config, tmp_path, capsys, override, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_run_config))
    code = main(["train", str(path), override, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("peftlab: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert not list((tmp_path / "runs").glob("*/metrics.json")), "no result may be left by a failed run"


def test_checkpointing_accumulation_and_periodic_checkpoints_work(tiny_run_config):
    tiny_run_config["train"].update(
        gradient_checkpointing=True, grad_accum_steps=2, max_steps=4, save_steps=2
    )
    tiny_run_config["eval"]["enabled"] = False
    run = train(validate_config(tiny_run_config), progress=False).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train_steps"] == 4
    assert metrics["real_tokens_trained"] == 4 * 2 * 2 * 32  # steps x accumulation x batch x block
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert (run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors").is_file()


def test_quiet_training_prints_no_log_dicts_and_no_bars(tiny_run_config, tmp_path, capsys):
    """--quiet: transformers prints each log dict when its bar is off; peftlab removes that printer."""
    path = tmp_path / "config.yaml"
    tiny_run_config["train"]["max_steps"] = 3
    path.write_text(yaml.safe_dump(tiny_run_config))
    assert main(["train", str(path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "'loss'" not in captured.out and "'train_runtime'" not in captured.out
    assert "it/s]" not in captured.err and "s/it]" not in captured.err  # no progress bars
    assert "tuned" in captured.out and "run folder:" in captured.out  # the table and the folder still print
