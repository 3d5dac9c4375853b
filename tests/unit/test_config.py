from pathlib import Path

import pytest
import yaml

from peftlab.config.loading import load_config, parse_overrides, validate_config
from peftlab.config.run import RunConfig
from peftlab.errors import ConfigError
from peftlab.methods.lora import LoraConfig

MINIMAL = {"data": {"train_path": "x.txt"}, "method": {"name": "lora"}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_overrides_are_nested_and_typed():
    tree = parse_overrides(
        ["method.r=16", "train.lr=1e-4", "data.keep_documents_apart=true", "model.name=a/b"]
    )
    assert tree == {
        "method": {"r": 16},
        "train": {"lr": 1e-4},
        "data": {"keep_documents_apart": True},
        "model": {"name": "a/b"},
    }


def test_overrides_replace_yaml_values(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["method.r=16", "train.max_steps=50"])
    assert isinstance(cfg.method, LoraConfig)
    assert cfg.method.r == 16 and cfg.train.max_steps == 50
    assert cfg.method.alpha == 16  # untouched default


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.rank=8"], "unknown config key 'method.rank' (did you mean 'method.r'?)"),
        (["trian.lr=1"], "unknown config key 'trian' (did you mean 'train'?)"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0 (got -1)"),
        (["method.dropout=1.5"], "method.dropout: Input should be less than 1 (got 1.5)"),
        (["method.r=0"], "method.r: Input should be greater than 0 (got 0)"),
        (["method.name=nope"], "unknown method 'nope'; registered methods: "),
        (["train.batch_size=many"], "train.batch_size: Input should be a valid integer"),
        (["eval.stride=600", "eval.window=512"], "eval.stride (600) must be <= eval.window (512)"),
        (["train"], "is not of the form key.sub=value"),
        (["train.lr.x=1"], "train.lr: Input should be a valid number"),
        (["model=3", "model.name=x"], "sets a key inside 'model', which is not a section"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL), overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_missing_section_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="missing required config key 'data'"):
        validate_config({"method": {"name": "lora"}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        ["method.r=4", "method.target_modules=[q_proj]", "eval.window=64", "eval.stride=32"],
    )
    again = load_config(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg
    assert again.method.target_modules == ["q_proj"]
    assert isinstance(again, RunConfig)


def test_every_shipped_config_validates():
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    from importlib import resources

    configs.append(Path(str(resources.files("peftlab") / "presets" / "demo.yaml")))
    assert len(configs) >= 3
    for path in configs:
        first_line = path.read_text().splitlines()[0]
        assert first_line.startswith("# peftlab "), f"{path} must start with its launch command"
        load_config(path)
