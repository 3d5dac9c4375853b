"""The Ray executor: each point of a sweep a Ray task on a fresh worker, as many at once as the
cluster's CPUs (and GPUs) allow, on a local Ray instance started for the sweep (loopback only) or an
existing cluster. Each task runs the same child command as the local executor and sends back its run
folder's small files, so the report can be built where the sweep was started.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from peftlab.compare.executors import PointResult, point_state, run_point
from peftlab.compare.sweep import Point, Sweep
from peftlab.errors import PeftlabError

# What a point's task sends back besides its PointResult: its run folder less these folders and
# files (weights and checkpoints stay where they were trained), plus its point config and log.
RESULT_SKIP_DIRS = frozenset({"checkpoints", "adapter", "model"})
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".npz", ".npy"})
RESULT_FILE_LIMIT = 16 * 2**20  # bytes; a larger file is no "small result file" and stays where it is
ADDRESS_TIMEOUT_S = 5.0  # a cluster address must accept a TCP connection within this
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # results are a few files per point
RAY_MISSING = "the Ray executor needs ray: pip install 'peftlab[dist]'"


def result_files(folder: Path, name: str) -> dict[str, bytes]:
    """The small result files of point `name` of the sweep in `folder` (path relative to the sweep
    folder -> bytes): manifest, metrics, config, log.jsonl, base metrics, samples, evaluation files,
    plots, the point's config and its log; not weights, checkpoints or temporary files. The
    manifest comes last, so a writer that goes in order never shows a completed run without its
    metrics."""
    files: dict[str, bytes] = {}
    run_dir = folder / "runs" / name
    if run_dir.is_dir():
        for root, dirs, names in os.walk(run_dir):
            top = Path(root) == run_dir
            dirs[:] = sorted(d for d in dirs if not (top and d in RESULT_SKIP_DIRS) and not d.startswith("."))
            for file in sorted(names):
                path = Path(root) / file
                if file.startswith(".") or path.suffix in WEIGHT_SUFFIXES or not path.is_file():
                    continue
                if path.stat().st_size <= RESULT_FILE_LIMIT:
                    files[path.relative_to(folder).as_posix()] = path.read_bytes()
    for extra in (folder / "points" / f"{name}.yaml", folder / "logs" / f"{name}.log"):
        if extra.is_file():
            files[extra.relative_to(folder).as_posix()] = extra.read_bytes()
    manifest = f"runs/{name}/manifest.json"
    if manifest in files:
        files[manifest] = files.pop(manifest)
    return files


def write_result_files(folder: Path, files: dict[str, bytes]) -> list[str]:
    """Write a task's result files into the sweep folder where they are missing or differ (on a
    local instance or a shared path they are the very files: nothing is written). Returns what was
    written."""
    written = []
    root = folder.resolve()
    for rel, data in files.items():
        target = (root / rel).resolve()
        if not target.is_relative_to(root):  # a task names files inside its sweep folder only
            raise PeftlabError(f"a Ray task returned a file outside the sweep folder: {rel}")
        if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
            continue
        _atomic_write_bytes(target, data)
        written.append(rel)
    return written


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def train_point_task(point: Point, folder: str, cwd: str) -> tuple[PointResult, dict[str, bytes]]:
    """A Ray task's body: what the local executor does for one point (the same child command, in the
    driver's working folder where this node has it), then the point's small result files."""
    sweep_folder = Path(folder)
    workdir = Path(cwd) if Path(cwd).is_dir() else None
    if workdir is None and not Path(point.config.output.dir).expanduser().is_absolute():
        why = (
            f"the sweep's output folder is relative and the folder it was started in ({cwd}) is not on "
            f"this node ({socket.gethostname()}): give the sweep an absolute `output` on shared storage"
        )
        return PointResult(point.name, "failed", why), {}
    result = run_point(point, sweep_folder, sweep_folder / "logs" / f"{point.name}.log", cwd=workdir)
    return result, result_files(sweep_folder, point.name)


def require_ray() -> None:
    """Ray is installed (found without importing it: importing ray changes the environment)."""
    if importlib.util.find_spec("ray") is None:
        raise PeftlabError(RAY_MISSING)


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise PeftlabError(RAY_MISSING) from None
    return ray


def check_address(address: str, timeout: float = ADDRESS_TIMEOUT_S) -> None:
    """A cluster address (HOST:PORT or ray://HOST:PORT) must accept a TCP connection within
    `timeout` seconds; ray.init itself retries an unreachable address for minutes."""
    if address in ("auto", "local"):
        return
    host, port = _address_host(address), address.rpartition(":")[2]
    if not host or not port.isdigit():
        raise PeftlabError(
            f"--address {address} is not HOST:PORT (e.g. 10.0.0.5:6379 or ray://10.0.0.5:10001)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise PeftlabError(
            f"cannot reach the Ray cluster at {address}: {why} (within {timeout:g} s); "
            "is the head node up (`ray start --head`) and the address the one it printed?"
        ) from None


def machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _address_host(address: str) -> str:
    return address.split("://", 1)[-1].rpartition(":")[0].strip("[]")


@contextlib.contextmanager
def _on_loopback(loopback: bool) -> Iterator[None]:
    """Ray turns 127.0.0.1 into this machine's network address; for a local instance or a cluster
    on the loopback, keep it 127.0.0.1 while ray.init runs (Ray's own switch for machines that are
    no cluster), so a local instance's servers listen on the loopback only."""
    from ray._private import ray_constants

    if not loopback or not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def ray_session(address: str | None = None, local_cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray, initialised for the block: a local instance on 127.0.0.1 with `local_cpus` CPUs (default:
    this machine's) when `address` is None, else the cluster at `address`. Shut down in `finally`;
    what ray.init and importing ray changed in this process is given back: the environment
    (RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_USAGE_STATS_ENABLED, PYTHONBREAKPOINT, RAY_CLIENT_MODE), the
    SIGTERM handler, sys.excepthook and Ray's cached authentication settings. What stays for as long
    as ray stays imported: ray/thirdparty_files in sys.path, warning filters for Ray's own warning
    classes, the `ray` logger's level."""
    environ, excepthook = dict(os.environ), sys.excepthook
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    ray = import_ray()
    try:
        if address is None:
            if "RAY_AUTH_MODE" not in os.environ and "RAY_AUTH_TOKEN" not in os.environ:
                # token authentication with a secret of this process, not one Ray would save in
                # ~/.ray/auth_token (the environment is given back below)
                os.environ["RAY_AUTH_MODE"] = "token"
                os.environ["RAY_AUTH_TOKEN"] = _local_token()
                _reread_auth_settings()
            with _on_loopback(True):
                try:
                    ray.init(
                        address="local",  # a new instance, not one RAY_ADDRESS or `ray start` left
                        num_cpus=local_cpus or machine_cpus(),
                        include_dashboard=False,
                        configure_logging=False,
                        log_to_driver=False,
                        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                        _node_ip_address="127.0.0.1",
                    )
                except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
                    raise PeftlabError(f"could not start a local Ray instance: {_first_line(exc)}") from None
        else:
            check_address(address)
            with _on_loopback(_address_host(address) in LOOPBACK_HOSTS):
                try:
                    ray.init(address=address, configure_logging=False, log_to_driver=False)
                except (ConnectionError, RuntimeError, TimeoutError, ValueError) as exc:
                    raise PeftlabError(
                        f"cannot connect to the Ray cluster at {address}: {_first_line(exc)}"
                    ) from None
        if sigterm is not None:  # ray.init installed its own (exit at once): keep the command's
            signal.signal(signal.SIGTERM, sigterm)
        yield ray
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        _restore_environ(environ)
        _reread_auth_settings()
        sys.excepthook = excepthook  # importing ray puts in its own (errors to the cluster's log)


_LOCAL_TOKEN: list[str] = []


def _local_token() -> str:
    """One secret per process for its local Ray instances (Ray caches the token it first reads)."""
    if not _LOCAL_TOKEN:
        _LOCAL_TOKEN.append(secrets.token_hex(32))
    return _LOCAL_TOKEN[0]


def _reread_auth_settings() -> None:
    """Ray caches the authentication mode and token it read from the environment: make it read them
    again when the block sets them and when it gives the environment back (so a later ray.init in
    this process, e.g. to a cluster, sees the user's settings, not the local instance's)."""
    try:
        raylet = importlib.import_module("ray._raylet")
        raylet.Config.initialize("")
        raylet.AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # internals of another Ray version: nothing to forget then
        pass


def _restore_environ(before: dict[str, str]) -> None:
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def ray_slots(resources: dict[str, float], cpus_per_point: float, gpus_per_point: float) -> int:
    """Points that run at once: the cluster's CPUs (and GPUs) over one point's."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus_per_point > cpus:
        raise PeftlabError(
            f"--cpus-per-point {cpus_per_point:g} is more than the Ray cluster has ({cpus:g} CPUs)"
        )
    if gpus_per_point > gpus:
        raise PeftlabError(
            f"--gpus-per-point {gpus_per_point:g} is more than the Ray cluster has ({gpus:g} GPUs)"
        )
    slots = int(cpus // cpus_per_point)
    if gpus_per_point > 0:
        slots = min(slots, int(gpus // gpus_per_point))
    return max(1, slots)


def run_ray(
    sweep: Sweep,
    report: Callable[[PointResult], None],
    address: str | None = None,
    cpus_per_point: float = 1.0,
    gpus_per_point: float = 0.0,
    local_cpus: int | None = None,
) -> None:
    """Each point a Ray task (`cpus_per_point` CPUs, `gpus_per_point` GPUs, a fresh worker process
    per point) on a local Ray instance started for the sweep (`address` None; `local_cpus` CPUs,
    default this machine's) or on the cluster at `address`; as many at once as the cluster's
    resources allow, each result reported as it comes. The run folders are written by the tasks
    into the sweep folder (on a cluster: a path every node shares, at the same place); each task
    also returns its small result files, written here where missing, so the report can be built
    where the sweep was started."""
    if not cpus_per_point > 0:
        raise PeftlabError(f"--cpus-per-point must be more than 0, got {cpus_per_point:g}")
    if not gpus_per_point >= 0:
        raise PeftlabError(f"--gpus-per-point must be 0 or more, got {gpus_per_point:g}")
    folder = sweep.folder.resolve()
    todo: deque[Point] = deque()
    for point in sweep.points:
        if point_state(folder / "runs" / point.name) == "completed":
            report(PointResult(point.name, "skipped"))
        else:
            todo.append(point)
    if not todo:
        return
    with ray_session(address, local_cpus) as ray:
        slots = ray_slots(ray.cluster_resources(), cpus_per_point, gpus_per_point)
        task = ray.remote(num_cpus=cpus_per_point, num_gpus=gpus_per_point, max_calls=1, max_retries=0)(
            train_point_task
        )
        cwd = str(Path.cwd())
        running: dict[Any, Point] = {}
        while todo or running:
            while todo and len(running) < slots:
                point = todo.popleft()
                running[task.remote(point, str(folder), cwd)] = point
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)  # signals get through
            for ref in done:
                point = running.pop(ref)
                try:
                    result, files = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died, the task raised
                    result, files = PointResult(point.name, "failed", _first_line(exc)), {}
                write_result_files(folder, files)
                report(result)
