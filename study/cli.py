"""`study` command line: run | launch | status | report | ui | server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"


def _cmd_run(args) -> int:
    from study import tracking
    from study.spec import load_spec, run_name, spec_hash
    from study.train import train

    spec = load_spec(args.spec, args.set)
    uri, exp_id = tracking.prepare(spec.tracking.uri, spec.tracking.experiment)
    print(f"run {run_name(spec)}  hash {spec_hash(spec)}  store {uri}  experiment {spec.tracking.experiment} ({exp_id})")
    result = train(spec, experiment_id=exp_id, fresh=args.fresh)
    if result.metrics:
        keys = ("test/miou", "test/macc", "test/mprec")
        print("  ".join(f"{k}={result.metrics[k]:.4f}" for k in keys if k in result.metrics))
    print(f"MLflow run {result.run_id} (experiment {exp_id}); browse with `study ui --store {uri}` "
          f"and open {ui_url('127.0.0.1', 5000, exp_id, result.run_id)}")
    return 0


def _cmd_launch(args) -> int:
    from study.launch import launch

    summary = launch(args.grid, executor=args.executor, fresh=args.fresh, dry_run=args.dry_run,
                     max_parallel=args.max_parallel, wait=not args.no_wait)
    if args.dry_run:
        return 0
    print(f"submitted {len(summary['submitted'])}, skipped {len(summary['skipped'])} finished, "
          f"failed {len(summary['failed'])}")
    return 1 if summary["failed"] else 0


def _cmd_status(args) -> int:
    import pandas as pd

    from study.launch import status

    rows = status(args.grid)
    frame = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.width", 200, "display.max_colwidth", 60):
        print(frame.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    counts = frame["state"].value_counts().to_dict()
    print("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 0


def _cmd_report(args) -> int:
    from analysis.report import write_report
    from study.grid import load_grid
    from study.tracking import resolve_uri

    grid = load_grid(args.grid)
    spec0 = grid.runs[0].spec
    uri = resolve_uri(args.store or spec0.tracking.uri)
    out = Path(args.out or f"results/{grid.name}")
    write_report(uri, out, grid=grid.name, experiment_names=[spec0.tracking.experiment])
    print(f"report written to {out}/README.md")
    return 0


def server_command(uri: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The `mlflow server` command line and environment this project uses (DESIGN.md §3)."""
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


def _cmd_server(args) -> int:
    from study.tracking import prepare

    _, exp_id = prepare(args.store, args.experiment)  # create the store once, before any job
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

    p = sub.add_parser("report", help="tables and figures of a grid's runs")
    p.add_argument("grid")
    p.add_argument("--out", default=None, help="output folder (default results/GRID_NAME)")
    p.add_argument("--store", default=None, help="tracking URI (default: the grid's)")
    p.set_defaults(func=_cmd_report)

    for name, help_text, host in (("ui", "open the MLflow UI on the project's store", "127.0.0.1"),
                                  ("server", "run a tracking server for cluster jobs", "127.0.0.1")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--store", default=DEFAULT_URI)
        p.add_argument("--host", default=host)
        p.add_argument("--port", type=int, default=5000)
        p.add_argument("--experiment", default="recall-study")
        p.add_argument("--auth", action="store_true", help="enable MLflow's basic-auth app")
        p.set_defaults(func=_cmd_server)
    return parser


def main(argv: list[str] | None = None) -> int:
    from study.launch import LaunchError
    from study.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, LaunchError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
