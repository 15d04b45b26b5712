"""`study` command line: run | launch | status | cancel | report | ui | server.

Every expected failure ends in one line on stderr, ``error: <file or run>: <key>: <what> (allowed: ...)``,
with exit status 2 for bad input (a spec, a grid, an option, a path) and 1 for a run that failed;
``study --debug COMMAND`` shows the traceback instead. Heavy libraries (torch, MLflow, submitit) are
imported only by the commands that need them, so ``study --help`` and ``study status`` start fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"


class CommandError(Exception):
    """Bad input found by the CLI itself (exit 2)."""


def _cmd_run(args) -> int:
    from study.plan import check_writable
    from study.spec import load_spec, run_name, spec_hash

    spec = load_spec(args.spec, args.set)
    check_writable(spec.tracking.checkpoint_root, str(args.spec))
    from study import tracking
    from study.train import TrainingFailed, train

    uri, exp_id = tracking.prepare(spec.tracking.uri, spec.tracking.experiment)
    print(f"run {run_name(spec)}  hash {spec_hash(spec)}  store {uri}  experiment {spec.tracking.experiment} ({exp_id})")
    try:
        result = train(spec, experiment_id=exp_id, fresh=args.fresh)
    except TrainingFailed as err:
        print(f"error: run {spec_hash(spec)} ({args.spec}): {one_line(err)}", file=sys.stderr)
        return 1
    if result.skipped:
        print(f"not trained: run {spec_hash(spec)} is {result.skipped}; see `study ui --store {uri}`")
        return 0
    if result.metrics:
        keys = ("test/miou", "test/macc", "test/mprec")
        print("  ".join(f"{k}={result.metrics[k]:.4f}" for k in keys if k in result.metrics))
    print(f"MLflow run {result.run_id} (experiment {exp_id}); browse with `study ui --store {uri}` "
          f"and open {ui_url('127.0.0.1', 5000, exp_id, result.run_id)}")
    return 0


class _Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during `study launch` (a KeyboardInterrupt: an in-process run stops resumable)."""

    def __init__(self, signum: int):
        self.signum = signum


def _raise_interrupted(signum, frame) -> None:
    raise _Interrupted(signum)


def _cmd_launch(args) -> int:
    """Launch; Ctrl-C or SIGTERM while waiting leaves the started jobs running and says how to follow
    or cancel them (no question asked)."""
    import signal

    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        from study.launch import launch

        summary = launch(args.grid, executor=args.executor, fresh=args.fresh, dry_run=args.dry_run,
                         max_parallel=args.max_parallel, wait=not args.no_wait)
    except _Interrupted as stop:
        name = signal.Signals(stop.signum).name
        print(f"\nlaunch stopped by {name}: jobs already started keep running; jobs not yet started will not start."
              f"\n  follow them:   study status {args.grid}\n  cancel them:   study cancel {args.grid}"
              f"\n  resume the rest later: study launch {args.grid}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.dry_run:
        return 0
    held = summary.get("held", {})
    print(f"submitted {len(summary['submitted'])}, skipped {len(summary['skipped'])} finished, "
          f"{len(held)} held by live jobs, failed {len(summary['failed'])}")
    for h, who in held.items():
        print(f"  {h} is held by live {who}: follow it with `study status {args.grid}`")
    return 1 if summary["failed"] else 0


def _format_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(x) for x in [c, *(b[i] for b in body)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def _cmd_status(args) -> int:
    """The grid's table (pandas-free: this command must not pay for heavy imports)."""
    from study.status import status

    rows = status(args.grid)
    columns = ["run", "hash", "status", "iteration", "of", "test_miou", "val_miou", "job"]
    if any("slurm" in r for r in rows):
        columns.append("slurm")
    print(_format_table(rows, columns))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


def _cmd_cancel(args) -> int:
    from study.cancel import cancel

    for item in args.only or []:
        if "=" not in item:
            raise CommandError(f"--only {item!r}: expected KEY=VALUE "
                               f"(allowed: an axis of the grid and one of its values)")
    cancel(args.grid, args.only)
    return 0


def _cmd_report(args) -> int:
    from study.grid import load_grid

    grid = load_grid(args.grid)
    out = Path(args.out or f"results/{grid.name}")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: is a file (allowed: a folder, created if missing)")
    spec0 = grid.runs[0].spec
    from study import storeview
    from study.tracking import resolve_uri

    uri = resolve_uri(args.store or spec0.tracking.uri)
    exp_id, found = storeview.runs_by_hash_any(uri, spec0.tracking.experiment)
    hashes = {r.hash for r in grid.runs}
    if not any(run["status"] == "FINISHED" for h in hashes for run in found.get(h, [])):
        raise CommandError(f"{args.grid}: no finished run of this grid in {uri} (experiment "
                           f"{spec0.tracking.experiment}) yet (allowed: a grid with finished runs; "
                           f"start it with `study launch {args.grid}`)")
    from analysis.report import write_report

    write_report(uri, out, grid=grid, experiment_names=[spec0.tracking.experiment])
    print(f"report written to {out}/README.md")
    return 0


def server_command(uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and environment this project uses."""
    from study.tracking import artifact_root_for, resolve_uri

    uri = resolve_uri(uri)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    root = artifact_root_for(uri)
    if root:
        cmd += ["--artifacts-destination", root]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    return cmd, env


def ui_url(host: str, port: int, experiment_id: str | None = None, run_id: str | None = None) -> str:
    """Browser address of the UI's training view (an experiment's runs table, or one run's page).

    MLflow 3.17's UI does not follow the experiment's ``mlflow.experimentKind`` tag: it opens every
    experiment in its GenAI view unless the address carries ``workflowType=machine_learning`` (or the
    "Model training" toggle was clicked once in that browser, which it remembers).
    """
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    route = f"/experiments/{experiment_id}" if experiment_id is not None else "/experiments"
    if run_id is not None:
        route += f"/runs/{run_id}"
    return f"http://{netloc}/#{route}?workflowType=machine_learning"


def _ui_experiment(args) -> str | None:
    """`study ui`: the experiment to open (None: the experiment list); reads, never creates, the store."""
    if args.grid is None:
        return None
    from study.grid import load_grid
    from study.tracking import find_experiment, resolve_uri

    spec0 = load_grid(args.grid).runs[0].spec
    if args.store == DEFAULT_URI:
        args.store = spec0.tracking.uri
    uri = resolve_uri(args.store)
    exp_id = find_experiment(uri, spec0.tracking.experiment)
    if exp_id is None:
        raise CommandError(f"{args.grid}: tracking.experiment: {spec0.tracking.experiment!r} is not in {uri} yet "
                           f"(allowed: a grid that was launched; `study launch {args.grid}` creates it)")
    return exp_id


def _cmd_ui(args) -> int:
    """Serve the store read-only: a missing sqlite store is an error, not created (nor is an experiment)."""
    exp_id = _ui_experiment(args)
    from study.tracking import resolve_uri, sqlite_path

    db = sqlite_path(resolve_uri(args.store))
    if db is not None and not db.exists():
        raise CommandError(f"--store {args.store}: {db} does not exist (allowed: an existing store; "
                           f"`study run` or `study launch` creates it)")
    return _serve(args, exp_id)


def _cmd_server(args) -> int:
    from study.tracking import prepare

    _, exp_id = prepare(args.store, args.experiment)  # create the store once, before any job
    return _serve(args, exp_id)


def _serve(args, exp_id: str | None) -> int:
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.auth:
        print(
            f"WARNING: binding the tracking server to {args.host} without authentication exposes every run to "
            "anyone who can reach this port. Add --auth (MLflow's basic-auth app: `mlflow server --app-name "
            "basic-auth`, set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD on clients) or keep 127.0.0.1.",
            file=sys.stderr,
        )
    cmd, env = server_command(args.store, args.host, args.port)
    if args.auth:
        cmd += ["--app-name", "basic-auth"]
    print(" ".join(cmd), flush=True)
    print(f"UI: {ui_url(args.host, args.port, exp_id)}", flush=True)
    # Become the server (no wrapper process): a SIGTERM to `study ui` then stops MLflow, which stops its
    # uvicorn worker, instead of leaving an orphaned server holding the port.
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="study", description="Recall-loss reproduction and ablation harness.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train and evaluate one run spec")
    p.add_argument("spec", help="run spec YAML")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec value (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("launch", help="launch every run of a grid (skips finished runs)")
    p.add_argument("grid")
    p.add_argument("--executor", default="local", choices=("debug", "local", "slurm"))
    p.add_argument("--fresh", action="store_true", help="restart unfinished runs from scratch, ignoring checkpoints")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted and skipped")
    p.add_argument("--max-parallel", type=int, default=None, help="concurrent jobs (local) / array parallelism (slurm)")
    p.add_argument("--no-wait", action="store_true", help="slurm: return after submitting")
    p.set_defaults(func=_cmd_launch)

    p = sub.add_parser("status", help="one table of every run of a grid")
    p.add_argument("grid")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="stop a grid's jobs (local and Slurm) and close their runs KILLED")
    p.add_argument("grid")
    p.add_argument("--only", action="append", metavar="KEY=VALUE",
                   help="only the runs whose axis KEY has VALUE (repeatable: all must match)")
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("report", help="tables and figures of a grid's runs")
    p.add_argument("grid")
    p.add_argument("--out", default=None, help="output folder (default results/GRID_NAME)")
    p.add_argument("--store", default=None, help="tracking URI (default: the grid's)")
    p.set_defaults(func=_cmd_report)

    for name, help_text, func in (("ui", "open the MLflow UI on an existing store (read-only)", _cmd_ui),
                                  ("server", "run a tracking server for cluster jobs", _cmd_server)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--store", default=DEFAULT_URI)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=5000)
        if name == "ui":
            p.add_argument("--grid", default=None, help="open this grid's experiment (default: the experiment list)")
        else:
            p.add_argument("--experiment", default="recall-study")
        p.add_argument("--auth", action="store_true", help="enable MLflow's basic-auth app")
        p.set_defaults(func=func)
    return parser


def exit_code(err: BaseException) -> int | None:
    """2 for bad input, 1 for a failed run, None for an unexpected error (shown as a traceback)."""
    from study.spec import SpecError

    launch_error = getattr(sys.modules.get("study.plan"), "LaunchError", None)  # only if it could be raised
    failed = getattr(sys.modules.get("study.train"), "TrainingFailed", None)
    if isinstance(err, (SpecError, CommandError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return 2
    if launch_error is not None and isinstance(err, launch_error):
        return 2
    if failed is not None and isinstance(err, failed):
        return 1
    return None


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\ninterrupted: `study {args.command}` stopped; a run continues from its last checkpoint when "
              f"started again with the same command", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - every expected failure becomes one line
        code = exit_code(err)
        if args.debug or code is None:
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return code
