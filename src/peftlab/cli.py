"""Command line: each subcommand parses, loads the config, and calls one library function."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from types import FrameType

from peftlab.errors import PeftlabError


def _preset(name: str) -> Path:
    return Path(str(resources.files("peftlab") / "presets" / f"{name}.yaml"))


def cmd_train(args: argparse.Namespace) -> int:
    from peftlab.config.loading import load_config
    from peftlab.reports.table import before_after_rows, render_text
    from peftlab.train.recipe import train

    if args.resume:
        if args.config:  # argparse puts the first override into `config` when --resume is used
            args.overrides.insert(0, args.config)
        if args.overrides:
            raise PeftlabError(
                "--resume continues a run exactly as configured; it takes no config or overrides"
            )
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").is_file():
            raise PeftlabError(f"{run_dir} is not a peftlab run folder (no config.yaml)")
        result = train(load_config(run_dir / "config.yaml"), progress=not args.quiet, resume_dir=run_dir)
    elif args.config is None:
        raise PeftlabError("give a config file (see configs/) or --resume RUN_DIR")
    else:
        result = train(load_config(args.config, args.overrides), progress=not args.quiet, force=args.force)
    print()
    print(render_text(before_after_rows(result.metrics)))
    print(f"\nrun folder: {result.run_dir}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from peftlab.config.loading import load_config
    from peftlab.reports.table import before_after_rows, render_markdown, render_text
    from peftlab.runs import atomic_write_text
    from peftlab.train.recipe import train

    cfg = load_config(_preset("demo"), args.overrides)
    print(
        f"demo: {cfg.method.name} on {cfg.model.name}; train on {cfg.data.train_path} "
        f"(first {cfg.data.max_train_tokens} tokens), evaluate on {cfg.data.eval_path} "
        f"(first {cfg.data.max_eval_tokens} tokens)"
    )
    result = train(cfg, progress=not args.quiet)
    rows = before_after_rows(result.metrics)
    atomic_write_text(result.run_dir / "report.md", render_markdown(rows) + "\n")
    print()
    print(render_text(rows))
    base, tuned = result.metrics.get("base", {}), result.metrics.get("tuned", {})
    if base and tuned:
        change = 100 * (tuned["perplexity"] / base["perplexity"] - 1)
        print(f"\nheld-out perplexity {base['perplexity']:.2f} -> {tuned['perplexity']:.2f} ({change:+.1f}%)")
    print(f"run folder: {result.run_dir}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from peftlab.config.loading import load_config
    from peftlab.model.loading import read_model_config, resolve_source
    from peftlab.sizing.plan import GPUS, plan, render, train_tokens

    if args.gpu is not None and args.gpu not in GPUS:
        raise PeftlabError(f"unknown --gpu {args.gpu!r}; known: {', '.join(GPUS)}")
    from peftlab.methods import get_method

    method = args.method or "lora"
    data: dict = {"train_path": "(not read by estimate)"}
    if get_method(method).head == "sequence_classification":  # a head method trains on classification data
        data["kind"] = "classification"
    base: dict = {"data": data, "method": {"name": method}}
    if args.model:
        args.overrides.insert(0, f"model.name={args.model}")
    if args.method and args.config:
        args.overrides.insert(0, f"method.name={args.method}")
    cfg = load_config(args.config, args.overrides, base=None if args.config else base)
    config = read_model_config(resolve_source(cfg.model, weights=False), cfg.model)
    loss = "standard" if cfg.train.loss == "standard" else "chunked"
    result = plan(cfg, config, gpu=args.gpu, loss=loss)
    print(render(result, cfg, args.tokens or train_tokens(cfg)))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from peftlab.reports.table import evaluation_rows, render_text

    overrides = list(args.overrides)
    if args.config is None and args.model is None:
        if args.run_dir is None:
            raise PeftlabError("give a run folder (peftlab eval RUN_DIR) or --config CONFIG [--model NAME]")
        if "=" in args.run_dir:
            raise PeftlabError(f"{args.run_dir!r} looks like an override; give the run folder first")
        from peftlab.evaluation.saved_run import evaluate_run

        if args.out:
            raise PeftlabError(
                "--out is for --config evaluations; a run's evaluation goes to RUN_DIR/eval.json"
            )
        result = evaluate_run(Path(args.run_dir), overrides, progress=not args.quiet)
        print()
        print(render_text(evaluation_rows(result["base"], result["tuned"], result["forgetting"])))
        print(f"\nwritten: {Path(args.run_dir) / 'eval.json'}")
        return 0
    if args.config is None:
        raise PeftlabError("--model needs --config CONFIG (the data and evaluation settings)")
    if args.run_dir is not None:  # argparse puts the first override into run_dir
        overrides.insert(0, args.run_dir)
    from peftlab.config.loading import load_config
    from peftlab.evaluation.saved_run import evaluate_base_model

    if args.model is not None:
        overrides.append(f"model.name={args.model}")
    # the method does not matter for a base model; a config written for evaluation may lack one
    cfg = load_config(args.config, overrides, base={"method": {"name": "full"}})
    out = Path(args.out) if args.out else None
    result = evaluate_base_model(cfg, progress=not args.quiet, out=out)
    print()
    print(render_text(evaluation_rows(result["base"], {}), headers=("metric", "base")))
    for row in result["samples"][:3]:
        print(f"\n> {row['prompt']}\n{row['base']}")
    if out is not None:
        print(f"\nwritten: {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    import functools

    from peftlab.compare.executors import Executor, run_local, run_sweep
    from peftlab.compare.on_ray import check_address, require_ray, run_ray
    from peftlab.compare.report import write_report
    from peftlab.compare.sweep import dry_run_table, load_sweep

    ray_options = {
        "--address": args.address,
        "--cpus-per-point": args.cpus_per_point,
        "--gpus-per-point": args.gpus_per_point,
    }
    if args.executor == "local" and any(v is not None for v in ray_options.values()):
        given = next(k for k, v in ray_options.items() if v is not None)
        raise PeftlabError(f"{given} is an option of the Ray executor: add --executor ray")
    sweep = load_sweep(args.sweep, args.overrides)
    print(dry_run_table(sweep))
    if args.dry_run:
        return 0
    executor: Executor = run_local
    if args.executor == "ray":
        require_ray()  # not installed, or the cluster unreachable: one line before the sweep folder exists
        if args.address is not None:
            check_address(args.address)
        executor = functools.partial(
            run_ray,
            address=args.address,
            cpus_per_point=1.0 if args.cpus_per_point is None else args.cpus_per_point,
            gpus_per_point=0.0 if args.gpus_per_point is None else args.gpus_per_point,
        )
    state = run_sweep(sweep, executor, progress=not args.quiet)
    if len(state["failed"]) < len(sweep.points):  # a report needs one finished run
        written = write_report([sweep.folder], sweep.folder / "report", force=False)
        print(f"report: {written['summary.md']}")
    if state["failed"]:
        print(
            f"peftlab: {len(state['failed'])} of {len(sweep.points)} points failed: {', '.join(state['failed'])}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from peftlab.compare.report import write_report

    paths = [Path(p) for p in args.paths]
    out = Path(args.out) if args.out else (paths[0] / "report" if len(paths) == 1 else Path("report"))
    written = write_report(paths, out, force=args.force)
    for name in ("comparison.csv", "summary.csv", "comparison.md", "summary.md"):
        print(f"written: {written[name]}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from peftlab.methods import get_method, method_names

    for name in method_names():
        print(f"{name:16s} {get_method(name).summary}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune as a config says; key.sub=value overrides follow it")
    p.add_argument("config", nargs="?", help="a YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="overrides such as method.r=16 train.max_steps=50")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest complete checkpoint")
    p.add_argument("--force", action="store_true", help="train even when the estimate says it will not fit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo", help="a short real LoRA fine-tune of the embedded SmolLM2 with a before/after table"
    )
    p.add_argument("overrides", nargs="*", help="overrides of the demo config, e.g. train.max_steps=5")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "estimate",
        help="memory and time of a run before anything is loaded (meta device, no weights): will it fit?",
    )
    p.add_argument("overrides", nargs="*", help="overrides such as method.r=16 train.batch_size=1")
    p.add_argument("--model", help="a built-in alias, a hub id, a model folder or a config.json")
    p.add_argument("--method", help="a registered method (default: lora, or the config's)")
    p.add_argument("--config", help="a YAML config to estimate (overrides and --model/--method apply on top)")
    p.add_argument(
        "--gpu",
        help="estimate for this GPU instead of this machine: t4, a10g, l4, 4090, a100-40, a100-80, h100",
    )
    p.add_argument("--tokens", type=int, help="training tokens, for the time estimate")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser(
        "eval",
        help="re-evaluate a run folder (base and tuned; writes RUN_DIR/eval.json), or a base model "
        "alone with --config (and --model)",
    )
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a completed run folder")
    p.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.max_examples=200")
    p.add_argument("--config", help="evaluate a base model alone with this config's data and eval settings")
    p.add_argument("--model", help="the base model (alias, folder, .gguf, hub id); default: the config's")
    p.add_argument("--out", metavar="FILE", help="with --config: also write the result as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "compare",
        help="run a sweep (equal token budgets, one process per run, finished runs skipped) and report",
    )
    p.add_argument("sweep", help="a sweep file (see configs/sweeps/)")
    p.add_argument("overrides", nargs="*", help="overrides of the base run config, e.g. data.sample=200")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and stop")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one run after another (default); ray: each run a Ray task, as many at once as "
        "the cluster's CPUs/GPUs allow (needs peftlab[dist])",
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help="with --executor ray: an existing Ray cluster (HOST:PORT or ray://HOST:PORT; the sweep "
        "folder must be a path every node shares); default: a local Ray instance for the sweep",
    )
    p.add_argument(
        "--cpus-per-point", type=float, metavar="N", help="with --executor ray: CPUs per run (default 1)"
    )
    p.add_argument(
        "--gpus-per-point", type=float, metavar="N", help="with --executor ray: GPUs per run (default 0)"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="tables, plots and findings from run folders or a sweep folder")
    p.add_argument("paths", nargs="+", metavar="DIR", help="a sweep folder, or run folders")
    p.add_argument("--out", help="report folder (default: DIR/report for one folder)")
    p.add_argument("--force", action="store_true", help="compare runs that differ in more than axes and seed")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("methods", help="list the registered fine-tuning methods")
    p.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from peftlab.cpu.huge_pages import for_this_command

    with for_this_command(), _terminate_as_interrupt():  # THP before anything imports torch
        return _run_command(build_parser().parse_args(argv))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """For the command's duration, SIGTERM (timeout, batch schedulers, Kubernetes, Ray) stops it as
    Ctrl-C does, so a run is marked interrupted instead of staying "running"; while training,
    GracefulInterrupt's handler saves a checkpoint first. The previous handler comes back after."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: leave SIGTERM as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_command(args: argparse.Namespace) -> int:
    # bitsandbytes logs a warning at import on CPUs without its optional kernels package; it is
    # not actionable and would land on every run's stderr.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # transformers 5 renames arguments and warns on every run; users cannot act on those warnings.
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args))
    except PeftlabError as exc:
        message = str(exc).replace("\n", " ")  # the contract is one line, whatever an error holds
        print(f"peftlab: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
