"""peftlab compare --executor ray on the tiny model: a local Ray instance (2 CPUs, 1 CPU per point)
gives the same run folders and metrics as the local executor, and the same report files (also from
the result files the tasks send back alone); an unreachable --address fails in one line within
seconds; the pytest process's environment is as before once the sweep is over."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from peftlab.cli import main
from peftlab.compare.on_ray import ray_slots, result_files, train_point_task, write_result_files
from peftlab.compare.report import write_report
from peftlab.compare.sweep import load_sweep
from peftlab.errors import PeftlabError
from sweep_helpers import sweep_base, write_sweep

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="ray is not installed: pip install 'peftlab[dist]' (or '.[dev]') to test the Ray executor",
)


@pytest.fixture()
def base(tiny_run_config: dict[str, Any]) -> dict[str, Any]:
    return sweep_base(tiny_run_config)


def losses(run: Path) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "log.jsonl").read_text().splitlines() if '"loss"' in ln]


def test_the_ray_executor_gives_the_local_executors_runs_metrics_and_report(base, tmp_path, monkeypatch):
    # the local instance gets 2 CPUs whatever this machine has: two points at once
    monkeypatch.setattr("peftlab.compare.on_ray.machine_cpus", lambda: 2)
    local = write_sweep(tmp_path / "local", base, axes={"method.r": [2, 4]})
    on_ray = write_sweep(tmp_path / "ray", base, axes={"method.r": [2, 4]})
    environ = dict(os.environ)

    started = time.perf_counter()
    assert main(["compare", str(local), "--quiet"]) == 0
    local_seconds = time.perf_counter() - started
    started = time.perf_counter()
    assert main(["compare", str(on_ray), "--quiet", "--executor", "ray", "--cpus-per-point", "1"]) == 0
    ray_seconds = time.perf_counter() - started
    print(f"\n2-point sweep: local executor {local_seconds:.1f} s, ray executor {ray_seconds:.1f} s")

    # Ray's changes to this process's environment (RAY_AUTH_MODE, PYTHONBREAKPOINT, ...) are undone
    assert dict(os.environ) == environ

    runs_local = sorted((tmp_path / "local" / "sweeps" / "s" / "runs").iterdir())
    runs_ray = sorted((tmp_path / "ray" / "sweeps" / "s" / "runs").iterdir())
    assert len(runs_local) == 2 and [r.name for r in runs_ray] == [r.name for r in runs_local]
    for a, b in zip(runs_local, runs_ray, strict=True):
        ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
        assert losses(a) == losses(b) and len(losses(a)) == 4
        assert ma["tuned"]["perplexity"] == mb["tuned"]["perplexity"]
        assert ma["train_steps"] == mb["train_steps"] == 4
        assert json.loads((b / "manifest.json").read_text())["status"] == "completed"
    state = json.loads((tmp_path / "ray" / "sweeps" / "s" / "sweep.json").read_text())
    assert {p["status"] for p in state["points"].values()} == {"completed"}
    for folder in (tmp_path / "local", tmp_path / "ray"):
        report = folder / "sweeps" / "s" / "report"
        for name in ("comparison.csv", "summary.csv", "comparison.md", "summary.md"):
            assert (report / name).stat().st_size > 0

    # where the nodes' sweep folder is not this machine's, the files the tasks send back are enough
    # for the report: written into an empty folder, they give the same summary
    ray_folder = tmp_path / "ray" / "sweeps" / "s"
    elsewhere = tmp_path / "elsewhere"
    for run in runs_ray:
        files = result_files(ray_folder, run.name)
        assert f"runs/{run.name}/metrics.json" in files and list(files)[-1].endswith("manifest.json")
        assert not any(f"/{d}/" in name for name in files for d in ("adapter", "checkpoints"))
        assert write_result_files(ray_folder, files) == []  # the very files: none written again
        assert write_result_files(elsewhere, files) == list(files)
    shutil.copy(ray_folder / "sweep.json", elsewhere / "sweep.json")
    write_report([elsewhere], elsewhere / "report", force=False)
    summary = (ray_folder / "report" / "summary.csv").read_text()
    assert (elsewhere / "report" / "summary.csv").read_text() == summary

    # a rerun finds every point finished: nothing is trained or written, no Ray instance is started
    stamps = {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs_ray}
    started = time.perf_counter()
    assert main(["compare", str(on_ray), "--quiet", "--executor", "ray"]) == 0
    assert time.perf_counter() - started < 30
    assert {r.name: (r / "metrics.json").stat().st_mtime_ns for r in runs_ray} == stamps
    assert dict(os.environ) == environ


def test_bad_ray_options_fail_in_one_line_before_anything_runs(base, tmp_path, capsys, monkeypatch):
    path = write_sweep(tmp_path, base, seeds=[0])

    def one_line_error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("peftlab: error: ") and "\n" not in err
        return err

    started = time.perf_counter()
    err = one_line_error(["compare", str(path), "--executor", "ray", "--address", "127.0.0.1:1"])
    assert time.perf_counter() - started < 15  # ray.init alone would retry for minutes
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in err
    assert "not HOST:PORT" in one_line_error(["compare", str(path), "--executor", "ray", "--address", "x"])
    assert "add --executor ray" in one_line_error(["compare", str(path), "--address", "127.0.0.1:1"])
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert "pip install 'peftlab[dist]'" in one_line_error(["compare", str(path), "--executor", "ray"])
    assert not (tmp_path / "sweeps").exists()

    # points at once: the cluster's CPUs (and GPUs) over a point's; more than the cluster has is refused
    assert ray_slots({"CPU": 2.0}, 1, 0) == 2 and ray_slots({"CPU": 8.0, "GPU": 2.0}, 1, 1) == 2
    with pytest.raises(PeftlabError, match="more than the Ray cluster has"):
        ray_slots({"CPU": 2.0}, 4, 0)
    # a node without the folder the sweep was started in cannot place a relative output folder: the
    # point fails in one line and nothing is written (rather than runs landing in the wrong place)
    monkeypatch.chdir(tmp_path)
    relative = write_sweep(tmp_path / "rel", base, seeds=[0])
    relative.write_text(relative.read_text().replace(str(tmp_path / "rel" / "sweeps"), "sweeps"))
    point = load_sweep(relative).points[0]
    result, files = train_point_task(point, str(tmp_path / "sweeps" / "s"), str(tmp_path / "not-here"))
    assert result.status == "failed" and "absolute `output` on shared storage" in (result.error or "")
    assert files == {} and not (tmp_path / "sweeps").exists()
