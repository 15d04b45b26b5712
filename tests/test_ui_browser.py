"""The MLflow UI in a real browser: a finished grid's runs, metrics and per-class artifact are visible.

Trains a two-run grid (debug executor) into a sqlite store, serves it with the project's `mlflow server`
command line (study.cli.server_command), and drives Debian's Chromium with Playwright through the
addresses `study ui` prints (study.cli.ui_url). Screenshots are saved under the test's tmp_path.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from study.cli import ui_url
from study.launch import launch
from tests.test_cli_ui import mlflow_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEP_TIMEOUT_MS = 45_000  # one UI step (the React app fetches, then renders); the machine is shared
RUN_NAME = "ce/resnet18/texdigits/s3"

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def finished_grid(tmp_path: Path, tiny) -> tuple[str, str, dict[str, str]]:
    """Launch a two-run grid (ce, recall) to completion; return (uri, experiment id, {run name: run id})."""
    base = tiny(train={"iterations": 2, "eval_interval": 2, "log_interval": 1},
                data={"texdigits": {"num_train": 4, "num_val": 2, "num_test": 2, "height": 32, "width": 48}})
    raw = {"name": "ui", "base": base, "axes": {"loss": ["ce", "recall"]},
           "resources": {"cpus": 1, "mem_gb": 1, "timeout_min": 10}}
    path = tmp_path / "ui.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    summary = launch(path, executor="debug", folder_root=tmp_path / "submitit", log=lambda *a, **k: None)
    assert len(summary["submitted"]) == 2 and not summary["failed"], summary
    client = MlflowClient(summary["uri"])
    runs = client.search_runs([summary["experiment_id"]])
    names = {r.info.run_name: r.info.run_id for r in runs if r.info.status == "FINISHED"}
    assert {RUN_NAME, "recall/resnet18/texdigits/s3", "grid:ui"} <= set(names), names
    return summary["uri"], summary["experiment_id"], names


def visible(locator):
    """The first match the user can see (the SPA keeps hidden copies of some elements)."""
    return locator.filter(visible=True).first


def test_mlflow_ui_shows_runs_metrics_and_per_class_artifact(tmp_path, tiny):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: install Debian's chromium (`apt-get install chromium`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing: pip install playwright")

    t0 = time.monotonic()
    uri, exp_id, run_ids = finished_grid(tmp_path, tiny)
    client = MlflowClient(uri)
    run = client.get_run(run_ids[RUN_NAME])
    with open(client.download_artifacts(run.info.run_id, "metrics/per_class_test.csv", str(tmp_path))) as f:
        per_class = {row["class"]: row for row in csv.DictReader(f)}
    assert "road" in per_class
    scored = {name: float(row["iou"]) for name, row in per_class.items() if row["iou"] != "nan"}
    best = max(scored, key=scored.get)
    assert scored[best] > 0, per_class  # a non-zero value to find in the preview
    timings = {"grid": time.monotonic() - t0}
    shots = {name: tmp_path / f"ui_{name}.png" for name in ("experiment", "run", "artifacts")}

    t1 = time.monotonic()
    with mlflow_server(uri, tmp_path / "server.log") as (host, port), sync_api.sync_playwright() as pw:
        timings["server"] = time.monotonic() - t1
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(STEP_TIMEOUT_MS)
        try:
            # Experiment page, through the address `study ui` prints: the training view's runs table,
            # with the grid's parent run and, once expanded, both child runs.
            t2 = time.monotonic()
            page.goto(ui_url(host, port, exp_id))
            visible(page.get_by_role("heading", name="Runs", exact=True)).wait_for()
            parent = page.locator("[role=gridcell]").filter(has=page.get_by_role("link", name="grid:ui", exact=True))
            visible(parent).wait_for()
            timings["experiment page"] = time.monotonic() - t2
            assert page.get_by_text("Evaluation runs", exact=True).filter(visible=True).count() == 0  # not GenAI
            visible(page.get_by_text("3 matching runs")).wait_for()
            visible(parent).locator("button").first.click()  # expand the parent's child runs
            for name in (RUN_NAME, "recall/resnet18/texdigits/s3"):
                visible(page.get_by_role("link", name=name, exact=True)).wait_for()
            page.screenshot(path=shots["experiment"])

            # Run page: name, training-view breadcrumb, and the test metrics with the logged values.
            page.goto(ui_url(host, port, exp_id, run.info.run_id))
            visible(page.get_by_role("heading", name=RUN_NAME, exact=True)).wait_for()
            visible(page.get_by_role("link", name="Runs", exact=True)).wait_for()
            visible(page.get_by_placeholder("Search metrics")).fill("test/m")
            for key in ("test/miou", "test/macc", "test/mprec"):
                row = visible(page.get_by_role("row").filter(has=page.get_by_role("link", name=key, exact=True)))
                row.scroll_into_view_if_needed()
                shown = row.get_by_role("cell").nth(1).inner_text().strip()
                assert float(shown) == pytest.approx(run.data.metrics[key], rel=1e-9), (key, shown)
            page.screenshot(path=shots["run"])

            # Artifacts tab: the per-class CSV is listed and its preview shows the class rows and values.
            visible(page.get_by_role("tab", name="Artifacts", exact=True)).click()
            visible(page.get_by_text("metrics", exact=True)).click()
            visible(page.get_by_text("per_class_test.csv", exact=True)).click()
            visible(page.get_by_text("metrics/per_class_test.csv", exact=True)).wait_for()
            for name in ("road", best):  # a street class, and the class the tiny model got best
                cell = visible(page.get_by_role("cell", name=name, exact=True))
                cell.wait_for()
                cells = visible(page.get_by_role("row").filter(has=cell)).get_by_role("cell")
                shown = {col: cells.nth(i).inner_text().strip() for i, col in enumerate(("class", "iou", "recall"))}
                for col in ("iou", "recall"):
                    assert float(shown[col]) == pytest.approx(float(per_class[name][col]), abs=1e-6), (name, shown)
            visible(page.get_by_role("cell", name="road", exact=True)).scroll_into_view_if_needed()
            page.screenshot(path=shots["artifacts"])
        except Exception:
            page.screenshot(path=tmp_path / "ui_failure.png")
            print(f"failure screenshot: {tmp_path / 'ui_failure.png'} (server log {tmp_path / 'server.log'})")
            raise
        finally:
            browser.close()
    timings["total"] = time.monotonic() - t0
    for name, path in shots.items():
        assert path.stat().st_size > 10_000, path
        print(f"screenshot {name}: {path}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
