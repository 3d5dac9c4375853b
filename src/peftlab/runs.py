"""Run folders: creation, atomic writes of JSON/YAML, and the manifest."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError

TRACKED_PACKAGES = (
    "peftlab",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "trl",
    "bitsandbytes",
    "galore-torch",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_dir(parent: str | Path) -> Path:
    """The output folder (output.dir, ~ expanded), refused in one line when it is a file, lies under
    a file or cannot be written; nothing is created (so a run can check it before any work)."""
    parent = Path(parent).expanduser()
    # the nearest path that exists (os.path answers False where a search permission is missing)
    existing = next(p for p in (parent, *parent.parents) if os.path.exists(p))
    if not os.path.isdir(existing):
        if existing == parent:
            raise PeftlabError(f"output.dir {parent} is a file, not a folder; set output.dir to a folder")
        raise PeftlabError(
            f"cannot create output folder {parent}: {existing} is a file; set output.dir to a folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        what = (
            f"output folder {parent}"
            if existing == parent
            else f"cannot create output folder {parent}: {existing}"
        )
        raise PeftlabError(f"{what} is not writable; set output.dir to a writable folder")
    return parent


def create_run_dir(parent: str | Path, name: str) -> Path:
    """Make runs/<name>/; a name that exists gets a numeric suffix instead of being overwritten."""
    parent = check_output_dir(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeftlabError(
            f"cannot create output folder {parent}: {exc.strerror}; set output.dir to a writable folder"
        ) from None
    for suffix in range(1000):
        candidate = parent / (name if suffix == 0 else f"{name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise PeftlabError(
                f"cannot create run folder {candidate}: {exc.strerror}; set output.dir to a writable folder"
            ) from None
    raise PeftlabError(f"too many runs named {name!r} in {parent}")


@dataclass
class RunFolder:
    """A run's folder and its manifest. manifest.json and metrics.json are written through here
    only, each atomically, so a reader sees the whole previous file or the whole new one."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def reopen(cls, path: Path) -> RunFolder:
        return cls(path, json.loads((path / "manifest.json").read_text(encoding="utf-8")))

    def update_manifest(self, **fields: Any) -> None:
        self.manifest.update(fields)
        atomic_write_json(self.path / "manifest.json", self.manifest)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_json(self.path / "metrics.json", metrics)


def load_run(run_dir: str | Path, allow_unfinished: bool = False) -> dict[str, Any]:
    """A run's manifest and metrics, for reports: failed or unfinished runs are refused unless asked."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise PeftlabError(f"{run_dir} is not a peftlab run folder (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PeftlabError(f"{manifest_path} is not valid JSON") from None
    status = manifest.get("status")
    metrics_path = run_dir / "metrics.json"
    if status != "completed" and not allow_unfinished:
        hint = f": {manifest['error']}" if manifest.get("error") else ""
        raise PeftlabError(f"run {run_dir} is {status}{hint}; pass allow_unfinished to include it anyway")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    if metrics is None and not allow_unfinished:
        raise PeftlabError(f"run {run_dir} has no metrics.json")
    return {"run_dir": str(run_dir), "manifest": manifest, "metrics": metrics}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    """The peftlab checkout's commit, when it runs from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def base_manifest(seed: int) -> dict[str, Any]:
    return {
        "status": "running",
        "started_at": now_iso(),
        "finished_at": None,
        "seed": seed,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
    }
