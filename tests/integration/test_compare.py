"""peftlab compare / report on the tiny model: a sweep expands, runs one process per point with
equal token budgets, skips finished points on a rerun, records a failed point and goes on; the
report's numbers equal hand computations from the run folders."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from peftlab.cli import main
from peftlab.compare.report import pareto_front
from peftlab.compare.sweep import load_sweep
from peftlab.errors import ConfigError
from sweep_helpers import sweep_base, write_sweep


@pytest.fixture()
def base(tiny_run_config: dict[str, Any]) -> dict[str, Any]:
    return sweep_base(tiny_run_config)


def test_expansion_products_pairs_seeds_and_equal_budgets(base, tmp_path):
    path = write_sweep(
        tmp_path,
        base,
        axes={"train.batch_size": [1, 2], "method.r,method.alpha": [[2, 4], [4, 8]]},
        seeds=[0, 1],
    )
    sweep = load_sweep(path)
    assert sweep.budget_tokens == 4 * 2 * 32  # the base's max_steps x batch x block
    assert len(sweep.points) == 2 * 2 * 2
    steps = {(p.settings["train.batch_size"], p.config.train.max_steps) for p in sweep.points}
    assert steps == {(1, 8), (2, 4)}  # equal tokens, not equal steps
    assert {(p.config.method.r, p.config.method.alpha) for p in sweep.points} == {(2, 4), (4, 8)}
    assert len({p.key for p in sweep.points}) == 8 and load_sweep(path).points == sweep.points  # stable
    literal = tmp_path / "literal.yaml"  # the paired key written as a YAML flow sequence
    literal.write_text(path.read_text().replace("method.r,method.alpha:", "[method.r, method.alpha]:"))
    assert [p.key for p in load_sweep(literal).points] == [p.key for p in sweep.points]


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"axes": {"method.rank": [4]}}, "unknown config key 'method.rank' (did you mean 'method.r'?)"),
        ({"axes": {"method.r": []}}, "axis 'method.r' has no values"),
        ({"axes": {"method.r": [4], "method.r,method.alpha": [[4, 8]]}}, "two axes set 'method.r'"),
        ({"axes": {"method.r": [4, -1]}}, "sweep point (method.r=-1, train.seed=0): method.r"),
        ({"axes": {"train.max_steps": [4]}}, "axis 'train.max_steps' cannot be swept"),
        ({"axes": {"train.batch_size": [3]}}, "is not a whole number of steps"),
        ({"axs": {}}, "unknown sweep key 'axs' (did you mean 'axes'?)"),
    ],
)
def test_bad_sweeps_fail_in_one_line_before_anything_trains(base, tmp_path, capsys, sweep, message):
    path = write_sweep(tmp_path, base, **sweep)
    with pytest.raises(ConfigError):
        load_sweep(path)
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_runs_skips_records_a_failure_and_reports(base, tmp_path, capsys):
    path = write_sweep(tmp_path, base, axes={"train.batch_size": [1, 2]}, seeds=[0, 1])
    assert main(["compare", str(path), "--quiet"]) == 0
    folder = tmp_path / "sweeps" / "s"
    runs = sorted((folder / "runs").iterdir())
    assert len(runs) == 4
    metrics = {r.name: json.loads((r / "metrics.json").read_text()) for r in runs}
    assert {m["real_tokens_trained"] for m in metrics.values()} == {4 * 2 * 32}  # equal budgets
    assert {m["train_steps"] for m in metrics.values()} == {4, 8}

    # a rerun skips every finished point: nothing is trained or written again
    stamps = {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs}
    assert main(["compare", str(path)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs} == stamps

    # the report: summary mean and std over seeds equal a hand computation from the run folders
    rows = list(csv.DictReader((folder / "report" / "summary.csv").open()))
    assert len(rows) == 2 and {r["seeds"] for r in rows} == {"2"}
    by_batch = {int(r["train.batch_size"]): r for r in rows}
    for batch in (1, 2):
        ppl = [m["tuned"]["perplexity"] for m in metrics.values() if m["train_steps"] == 8 // batch]
        assert float(by_batch[batch]["quality_mean"]) == pytest.approx(statistics.fmean(ppl), rel=1e-5)
        assert float(by_batch[batch]["quality_std"]) == pytest.approx(statistics.stdev(ppl), rel=1e-4)
    comparison = list(csv.DictReader((folder / "report" / "comparison.csv").open()))
    assert len(comparison) == 4
    summary_md = (folder / "report" / "summary.md").read_text()
    assert "## Findings" in summary_md and "Best held-out perplexity" in summary_md
    for plot in ("loss_curves", "quality_before_after", "peak_vs_quality", "train_vs_quality"):
        assert (folder / "report" / "plots" / f"{plot}.png").stat().st_size > 2000

    # another sweep's runs in the same folder are refused
    other = write_sweep(tmp_path, base, axes={"train.batch_size": [1]}, seeds=[5])
    assert main(["compare", str(other)]) == 2
    assert "not points of this sweep" in capsys.readouterr().err


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(base, tmp_path, capsys):
    # rank 64 is over the tiny model's 32-wide layers only for galore: that point fails when it runs
    base = {**base, "method": {"name": "galore", "rank": 4, "target_modules": ["q_proj"]}}
    path = write_sweep(tmp_path, base, axes={"method.rank": [4, 64]})
    assert main(["compare", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 points failed" in err
    state = json.loads((tmp_path / "sweeps" / "s" / "sweep.json").read_text())
    statuses = sorted(p["status"] for p in state["points"].values())
    assert statuses == ["completed", "failed"]
    failed = next(p for p in state["points"].values() if p["status"] == "failed")
    assert "galore.rank=64 is larger than layer" in failed["error"]


def test_report_refuses_runs_that_differ_in_more_than_axes_and_seed(base, tmp_path, capsys):
    one = {**base, "output": {"dir": str(tmp_path / "runs"), "name": "a"}}
    two = {
        **base,
        "eval": {**base["eval"], "window": 8, "stride": 4},
        "output": {"dir": str(tmp_path / "runs"), "name": "b"},
    }
    for cfg in (one, two):
        (tmp_path / f"{cfg['output']['name']}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train", str(tmp_path / f"{cfg['output']['name']}.yaml"), "--quiet"]) == 0
    folders = [str(tmp_path / "runs" / "a"), str(tmp_path / "runs" / "b")]
    # run folders without a sweep may differ in method and training settings only
    assert main(["report", *folders, "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "eval.stride, eval.window" in err and not (tmp_path / "rep").exists()
    assert main(["report", *folders, "--out", str(tmp_path / "rep"), "--force"]) == 0
    assert "Forced" in (tmp_path / "rep" / "comparison.md").read_text()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2


def test_pareto_front_equals_a_brute_force_check():
    import random

    rng = random.Random(0)
    for _ in range(50):
        points = [(rng.randint(1, 6), rng.randint(1, 6)) for _ in range(rng.randint(1, 9))]
        for higher in (True, False):

            def beats(a: tuple[int, int], b: tuple[int, int], higher: bool = higher) -> bool:
                better_q = a[1] > b[1] if higher else a[1] < b[1]
                as_good = a[1] >= b[1] if higher else a[1] <= b[1]
                return a[0] <= b[0] and as_good and (a[0] < b[0] or better_q)

            expected = {
                i
                for i, p in enumerate(points)
                if not any(beats(q, p) for j, q in enumerate(points) if j != i)
            }
            assert pareto_front([(float(c), float(q)) for c, q in points], higher) == expected
    # a hand case: (cost, quality), higher quality better
    assert pareto_front([(1.0, 0.5), (2.0, 0.9), (3.0, 0.8), (2.0, 0.4)], True) == {0, 1}


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_ready_sweep_expands_offline_with_equal_budgets(path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the sweeps name ../shared/data relative to the repository
    assert path.read_text().startswith(f"# peftlab compare configs/sweeps/{path.name}")
    sweep = load_sweep(path)
    assert len(sweep.points) >= 4 and len({p.name for p in sweep.points}) == len(sweep.points)
    from peftlab.compare.sweep import tokens_per_step

    assert {(p.config.train.max_steps or 0) * tokens_per_step(p.config) for p in sweep.points} == {
        sweep.budget_tokens
    }
    assert main(["compare", str(path), "--dry-run"]) == 0
    assert f"{len(sweep.points)} runs" in capsys.readouterr().out


def test_a_whole_section_axis_replaces_the_base_section(base, tmp_path):
    path = write_sweep(tmp_path, base, axes={"method": [{"name": "ia3"}, {"name": "lora", "r": 2}]})
    points = load_sweep(path).points
    assert [p.config.method.name for p in points] == ["ia3", "lora"]
    assert points[1].config.method.r == 2 and points[1].config.method.target_modules != ["q_proj", "v_proj"]


# Imported by every Python process started with this folder on PYTHONPATH: a point's training
# process kills itself with SIGKILL once checkpoint-N is complete, as a machine that dies would.
KILL_HOOK = """
import os, signal
step = int(os.environ.get("PEFTLAB_TEST_KILL_AT", "0"))
if step:
    from transformers import TrainerCallback
    from peftlab.train import recipe

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == step:
                os.kill(os.getpid(), signal.SIGKILL)

    build = recipe.build_trainer

    def build_and_arm(run, model):
        trainer = build(run, model)
        trainer.add_callback(KillAfterCheckpoint())  # after CheckpointMarker: the checkpoint is complete
        return trainer

    recipe.build_trainer = build_and_arm
"""


def test_a_point_killed_mid_run_resumes_and_ends_as_an_uninterrupted_sweep(base, tmp_path, monkeypatch):
    base = {**base, "train": {**base["train"], "save_steps": 2, "max_steps": 6}}
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    killed_sweep = write_sweep(tmp_path / "a", base, seeds=[0])
    clean_sweep = write_sweep(tmp_path / "b", base, seeds=[0])
    monkeypatch.setenv("PYTHONPATH", str(hook))
    monkeypatch.setenv("PEFTLAB_TEST_KILL_AT", "4")
    assert main(["compare", str(killed_sweep), "--quiet"]) == 1  # the point died: recorded, not lost
    run = next((tmp_path / "a" / "sweeps" / "s" / "runs").iterdir())
    assert json.loads((run / "manifest.json").read_text())["status"] == "running"  # SIGKILL: no goodbye
    assert not (run / "metrics.json").exists()
    monkeypatch.delenv("PEFTLAB_TEST_KILL_AT")
    assert main(["compare", str(killed_sweep), "--quiet"]) == 0  # resumed from checkpoint-4
    assert main(["compare", str(clean_sweep), "--quiet"]) == 0
    resumed = json.loads((run / "manifest.json").read_text())
    assert [r["from"] for r in resumed["resumed"]] == ["checkpoint-4"]
    clean = next((tmp_path / "b" / "sweeps" / "s" / "runs").iterdir())
    assert run.name == clean.name  # the same point, the same key

    def losses(folder: Path) -> list[float]:
        return [
            json.loads(ln)["loss"] for ln in (folder / "log.jsonl").read_text().splitlines() if '"loss"' in ln
        ]

    assert losses(run) == losses(clean) and len(losses(run)) == 6
    a = json.loads((run / "metrics.json").read_text())
    b = json.loads((clean / "metrics.json").read_text())
    assert a["tuned"]["perplexity"] == b["tuned"]["perplexity"]
    summary_a = (tmp_path / "a" / "sweeps" / "s" / "report" / "summary.csv").read_text()
    summary_b = (tmp_path / "b" / "sweeps" / "s" / "report" / "summary.csv").read_text()
    drop_time = lambda text: [  # noqa: E731 - wall times differ between any two runs
        {
            k: v
            for k, v in row.items()
            if "seconds" not in k
            and "tokens_per_second" not in k
            and "memory" not in k
            and "train_seconds" not in k
            and "pareto" not in k
        }
        for row in csv.DictReader(io.StringIO(text))
    ]
    assert drop_time(summary_a) == drop_time(summary_b)
