"""`peftlab demo` (cut down to the tiny model and tiny text) and `peftlab methods`, run through the
command line's own entry point."""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftlab.cli import main
from peftlab.methods import get_method, method_names


def test_demo_runs_end_to_end_on_the_tiny_model(tiny_model_dir, text_files, tmp_path, capsys):
    train_file, held_out = text_files
    code = main(
        [
            "demo",
            f"model.name={tiny_model_dir}",
            "model.device=cpu",
            "model.dtype=float32",
            f"data.train_path={train_file}",
            f"data.eval_path={held_out}",
            "data.block_size=32",
            "method.r=4",
            "train.max_steps=2",
            "train.warmup_steps=0",
            "train.lr=5e-3",
            "eval.window=32",  # the demo's 512 is past the tiny model's 256 positions
            "eval.stride=16",
            "eval.max_new_tokens=4",
            f"output.dir={tmp_path / 'runs'}",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    # what the demo says it does names the overridden model and data
    assert out.startswith(f"demo: lora on {tiny_model_dir}; train on {train_file}")

    folder = re.search(r"^run folder: (.+)$", out, re.MULTILINE)
    assert folder is not None, out
    run = Path(folder.group(1))
    assert run == tmp_path / "runs" / "demo"
    manifest = json.loads((run / "manifest.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert manifest["status"] == "completed" and manifest["device"] == "cpu"
    assert metrics["train_steps"] == 2
    base, tuned = metrics["base"]["perplexity"], metrics["tuned"]["perplexity"]
    assert base != tuned  # two steps at this rate move the adapter off zero

    # the printed summary line carries the run's own numbers
    line = re.search(r"^held-out perplexity (\S+) -> (\S+) \((\S+)%\)$", out, re.MULTILINE)
    assert line is not None, out
    assert line.groups() == (f"{base:.2f}", f"{tuned:.2f}", f"{100 * (tuned / base - 1):+.1f}")

    # report.md: a Markdown before/after table with the same perplexities (3 decimals); forgetting
    # says skipped (the demo turns the second general-text pass off)
    report = (run / "report.md").read_text().splitlines()
    assert report[:2] == ["| metric | base | tuned |", "|---|---|---|"]
    split = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in report[2:]]
    cells = {row[0]: row[1:] for row in split}
    assert all(len(row) == 3 for row in split)
    assert cells["perplexity (token-level, L=32, S=16)"] == [f"{base:.3f}", f"{tuned:.3f}"]
    assert cells["eval tokens scored"] == [f"{metrics['base']['tokens']:,d}"] * 2
    assert "train time" in cells and "trainable params" in cells
    assert cells["forgetting"] == ["", "skipped"]
    assert metrics["forgetting"] == {"skipped": "eval.forgetting_path is null"}
    samples = [json.loads(s) for s in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3  # the demo's three side-by-side prompts


def test_methods_lists_every_registered_method_once(capsys):
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = method_names()
    assert len(names) >= 5 and len(lines) == len(names)
    for line, name in zip(lines, names, strict=True):
        listed, summary = line.split(maxsplit=1)
        assert listed == name and summary == get_method(name).summary and summary.strip()
