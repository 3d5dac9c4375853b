"""What a sweep costs beyond its runs: the wall time of a small real sweep against the time its runs
spent inside their own processes, per point, for the local executor and for Ray.

    .venv/bin/python bench/sweep.py                 # 2 LoRA points on SmolLM2, local then Ray
    .venv/bin/python bench/sweep.py --no-ray --budget 2048

A run's own time is its manifest's started_at -> finished_at (run folder created -> results written:
loading, base and tuned evaluation, training). The rest of the sweep's wall time is the sweep's
overhead: the process start and imports of each point, its set-up before the run folder (tokenizer,
data, the estimate), and the report. The base model is evaluated once (the cache) and then reused.
Run it alone on the machine: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def sweep_file(folder: Path, budget: int) -> Path:
    base = yaml.safe_load((ROOT / "configs" / "wikitext-lora.yaml").read_text())
    base["data"]["train_path"] = str(ROOT / base["data"]["train_path"])
    base["data"]["eval_path"] = str(ROOT / base["data"]["eval_path"])
    sweep = {
        "base": base,
        "overrides": ["data.max_eval_tokens=1024", "eval.sample_prompts=[]", "eval.forgetting_path=null"],
        "name": "bench",
        "output": str(folder),
        "budget_tokens": budget,
        "axes": {"method.r": [4, 8]},
    }
    path = folder / "sweep.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep))
    return path


def run_seconds(run: Path) -> float:
    manifest = json.loads((run / "manifest.json").read_text())
    start, end = (datetime.fromisoformat(manifest[k]) for k in ("started_at", "finished_at"))
    return (end - start).total_seconds()


def measure(executor: str, folder: Path, budget: int, cpus_per_point: int | None = None) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    path = sweep_file(folder, budget)
    command = [sys.executable, "-m", "peftlab", "compare", str(path), "--quiet", "--executor", executor]
    if cpus_per_point is not None:
        command += ["--cpus-per-point", str(cpus_per_point)]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{executor} sweep failed:\n{done.stderr[-2000:]}")
    runs = sorted((folder / "bench" / "runs").iterdir())
    own = [run_seconds(r) for r in runs]
    return {
        "executor": executor if cpus_per_point is None else f"{executor}, {cpus_per_point} CPU/point",
        "points": len(runs),
        "wall_seconds": wall,
        "runs_own_seconds": own,
        "overhead_seconds_per_point": (wall - sum(own)) / len(runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=4096, help="training tokens per point")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = [measure("local", out / "sweep-local", args.budget)]
    if not args.no_ray:
        # all of the machine's CPUs per point: one point at a time, like the local executor, so the
        # overhead compares; then one CPU per point: points side by side (their own times overlap, so
        # only the wall time says anything there)
        cpus = len(os.sched_getaffinity(0))
        rows.append(measure("ray", out / "sweep-ray", args.budget, cpus_per_point=cpus))
        rows.append(measure("ray", out / "sweep-ray-parallel", args.budget, cpus_per_point=1))
    for r in rows:
        overlap = "1 CPU/point" in r["executor"]
        tail = "" if overlap else f", overhead {r['overhead_seconds_per_point']:.1f} s/point"
        print(
            f"{r['executor']:18s} {r['points']} points: wall {r['wall_seconds']:.1f} s, runs' own "
            f"{' + '.join(f'{s:.1f}' for s in r['runs_own_seconds'])} s{tail}"
        )
    if len(rows) > 1:
        added = rows[1]["overhead_seconds_per_point"] - rows[0]["overhead_seconds_per_point"]
        print(f"Ray (one point at a time) adds {added:.1f} s per point over the local executor")
    (out / "sweep.json").write_text(json.dumps(rows, indent=2))
    print(f"written {out / 'sweep.json'}")


if __name__ == "__main__":
    main()
