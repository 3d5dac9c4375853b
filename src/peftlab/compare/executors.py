"""Running a sweep's points: each in a process of its own, finished points skipped, interrupted ones
resumed from their newest complete checkpoint, a failed point recorded and the sweep going on.

A point's process is `python -m peftlab train <point config>` (or `--resume <run folder>`), so its
memory figure is its own and no process-wide setting of one run (glibc's malloc thresholds, the
huge-page allocation) leaks into the next. `sweep.json` in the sweep folder lists the points and
their state; it is rewritten atomically after each point, so a sweep killed at any moment and
started again picks up where it was, with nothing counted twice.

Two executors: `run_local` (one point after another on this machine) and `on_ray.run_ray` (each point a
Ray task on a fresh worker, as many at once as the cluster's CPUs allow, on a local Ray instance or
an existing cluster). Both run the same child command, so they give the same run folders.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftlab.compare.sweep import Point, Sweep
from peftlab.errors import ConfigError
from peftlab.runs import atomic_write_json, atomic_write_text, now_iso
from peftlab.train.checkpoints import newest_complete_checkpoint

STATE_FILE = "sweep.json"


@dataclass
class PointResult:
    name: str
    status: str  # completed | skipped (completed before) | failed | interrupted
    error: str | None = None
    seconds: float = 0.0


def point_state(run_dir: Path) -> str:
    """'completed', 'resumable', 'fresh' (no run folder) or 'broken' (a folder with nothing to resume)."""
    manifest = run_dir / "manifest.json"
    if not manifest.is_file():
        return "fresh" if not run_dir.exists() else "broken"
    try:
        status = json.loads(manifest.read_text(encoding="utf-8")).get("status")
    except (json.JSONDecodeError, UnicodeDecodeError):
        status = None
    if status == "completed" and (run_dir / "metrics.json").is_file():
        return "completed"
    return "resumable" if newest_complete_checkpoint(run_dir) is not None else "broken"


def check_folder_is_this_sweeps(sweep: Sweep) -> None:
    """A sweep folder holds this sweep's runs only: a run folder that is no point of it means the
    folder belongs to another sweep (or the sweep changed its base or budget)."""
    runs = sweep.folder / "runs"
    if not runs.is_dir():
        return
    names = {p.name for p in sweep.points}
    foreign = sorted(d.name for d in runs.iterdir() if d.is_dir() and d.name not in names)
    if foreign:
        raise ConfigError(
            f"sweep folder {sweep.folder} holds runs that are not points of this sweep ({foreign[0]}"
            f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): another sweep, or this one with "
            "another base or budget; give the sweep another name or output folder"
        )


def point_command(point: Point, folder: Path) -> list[str]:
    """The command that trains (or resumes) `point` of the sweep in `folder` in a process of its own."""
    run_dir = folder / "runs" / point.name
    state = point_state(run_dir)
    if state == "resumable":
        return [sys.executable, "-m", "peftlab", "train", "--resume", str(run_dir), "--quiet"]
    if state == "broken":  # killed before its first checkpoint: nothing to resume, start again
        shutil.rmtree(run_dir)
    config = folder / "points" / f"{point.name}.yaml"
    atomic_write_text(config, point.config.to_yaml())
    return [sys.executable, "-m", "peftlab", "train", str(config), "--quiet"]


def run_point(point: Point, folder: Path, log: Path, cwd: Path | None = None) -> PointResult:
    """Train one point of the sweep in `folder` in a child process (in `cwd`, default this process's
    working folder); its output goes to `log` (appended)."""
    if point_state(folder / "runs" / point.name) == "completed":
        return PointResult(point.name, "skipped")
    command = point_command(point, folder)
    started = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n== {now_iso()} {' '.join(command)}\n")
        out.flush()
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False, cwd=cwd).returncode
    seconds = time.perf_counter() - started
    if code == 0:
        return PointResult(point.name, "completed", seconds=seconds)
    return PointResult(point.name, "interrupted" if code == 130 else "failed", _last_error(log), seconds)


def _last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("peftlab: error:") or "Error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


Executor = Callable[[Sweep, Callable[[PointResult], None]], None]


def run_local(sweep: Sweep, report: Callable[[PointResult], None]) -> None:
    """One point after another in this machine's processes."""
    for point in sweep.points:
        report(run_point(point, sweep.folder, sweep.folder / "logs" / f"{point.name}.log"))


def run_sweep(sweep: Sweep, executor: Executor = run_local, progress: bool = True) -> dict[str, Any]:
    """Run every point not finished yet; sweep.json records each point's state as it ends.
    Returns the state (with `failed`: the names of points that failed)."""
    check_folder_is_this_sweeps(sweep)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "sweep": sweep.name,
        "budget_tokens": sweep.budget_tokens,
        "axes": [{"keys": list(a.keys), "values": [list(v) for v in a.values]} for a in sweep.axes],
        "points": {p.name: {"key": p.key, "settings": p.settings, "status": "pending"} for p in sweep.points},
    }
    previous = sweep.folder / STATE_FILE
    if previous.is_file():
        for name, old in json.loads(previous.read_text(encoding="utf-8")).get("points", {}).items():
            if name in state["points"]:
                state["points"][name].update({k: old[k] for k in ("status", "error", "seconds") if k in old})
    atomic_write_json(previous, state)
    done = [0]

    def record(result: PointResult) -> None:
        done[0] += 1
        entry = state["points"][result.name]
        if result.status != "skipped":
            entry.update(
                status=result.status, error=result.error, seconds=result.seconds, finished_at=now_iso()
            )
        atomic_write_json(previous, state)
        if progress:
            why = f": {result.error}" if result.error else ""
            print(f"[{done[0]}/{len(sweep.points)}] {result.name}: {result.status}{why}", flush=True)

    executor(sweep, record)
    state["failed"] = [n for n, p in state["points"].items() if p["status"] in ("failed", "interrupted")]
    return state
