"""The MLflow UI in a real browser: a finished grid's runs, metrics and per-class artifact are visible;
the grid's parent run shows the report (claims table, a figure); a run's page shows its description
(test mIoU) and its dataset with the content digest.

Trains a two-run grid (debug executor) into a sqlite store, writes its report (`study report`'s
``write_report``), serves the store with the project's `mlflow server` command line
(study.cli.server_command), and drives Debian's Chromium with Playwright through the addresses
`study ui` prints (study.cli.ui_url). Screenshots are saved under the test's tmp_path; with
``STUDY_UI_SCREENSHOTS=docs/ui`` the parent-run and run-page screenshots are also written there,
reduced to a palette (the copies committed in docs/ui/).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from analysis.report import write_report
from study.cli import ui_url
from study.data import data_fingerprint
from study.grid import load_grid
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
    write_report(summary["uri"], tmp_path / "report", grid=load_grid(path), experiment_names=["tests"])
    return summary["uri"], summary["experiment_id"], names


def per_class_rows(client, run_id: str, tmp_path: Path) -> tuple[dict[str, dict], str]:
    """The run's per-class CSV rows by class, and the class with the best non-zero IoU."""
    with open(client.download_artifacts(run_id, "metrics/per_class_test.csv", str(tmp_path))) as f:
        per_class = {row["class"]: row for row in csv.DictReader(f)}
    assert "road" in per_class
    scored = {name: float(row["iou"]) for name, row in per_class.items() if row["iou"] != "nan"}
    best = max(scored, key=scored.get)
    assert scored[best] > 0, per_class  # a non-zero value to find in the preview
    return per_class, best


def check_run_metrics(page, url: str, run, shot: Path) -> None:
    """Run page: name, training-view breadcrumb, and the test metrics with the logged values."""
    page.goto(url)
    visible(page.get_by_role("heading", name=RUN_NAME, exact=True)).wait_for()
    visible(page.get_by_role("link", name="Runs", exact=True)).wait_for()
    visible(page.get_by_placeholder("Search metrics")).fill("test/m")
    for key in ("test/miou", "test/macc", "test/mprec"):
        row = visible(page.get_by_role("row").filter(has=page.get_by_role("link", name=key, exact=True)))
        row.scroll_into_view_if_needed()
        shown = row.get_by_role("cell").nth(1).inner_text().strip()
        assert float(shown) == pytest.approx(run.data.metrics[key], rel=1e-9), (key, shown)
    page.screenshot(path=shot)


def check_per_class_preview(page, per_class: dict[str, dict], best: str, shot: Path) -> None:
    """Artifacts tab: the per-class CSV is listed and its preview shows the class rows and values."""
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
    page.screenshot(path=shot)


CLAIM = "recall loss raises mAcc over CE (~9 % relative)"  # first row of the claims table


def open_page(page, url: str, heading: str) -> None:
    """Open a run page afresh (not as an in-app route change, which keeps the last page's scroll and
    description state), close the assistant side panel, expand the description."""
    page.goto("about:blank")
    page.goto(url)
    visible(page.get_by_role("heading", name=heading, exact=True)).wait_for()
    close = page.get_by_role("button", name="Close", exact=True).filter(visible=True)
    if close.count():
        close.first.click()
    visible(page.get_by_role("button", name="Expand description")).click()


def check_parent_run(page, url: str, shot: Path) -> None:
    """The grid's parent run: the claims table in its description, the mIoU/mAcc figure rendered."""
    open_page(page, url, "grid:ui")
    visible(page.get_by_role("heading", name="Claims of the paper")).wait_for()
    row = visible(page.get_by_role("row").filter(has=page.get_by_role("cell", name=CLAIM, exact=True)))
    assert "recall vs ce" in row.inner_text()
    img = visible(page.locator("img[src*='figures/miou_macc.png']"))
    img.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=img.element_handle())
    visible(page.get_by_text("Description", exact=True)).evaluate("e => e.scrollIntoView({block: 'start'})")
    page.screenshot(path=shot)


def check_run_description(page, url: str, run, digest: str, shot: Path) -> None:
    """A run's description states its test mIoU (in %, as logged) and its dataset carries the digest."""
    open_page(page, url, RUN_NAME)
    table = visible(page.locator("table").filter(has=page.get_by_role("columnheader", name="test mIoU")))
    cells = table.get_by_role("cell")
    assert float(cells.nth(0).inner_text()) == pytest.approx(100 * run.data.metrics["test/miou"], abs=0.006)
    visible(page.get_by_text(f"texdigits ({digest})", exact=True)).wait_for()  # Datasets: name (digest)
    page.screenshot(path=shot)
    with page.expect_popup() as opened:  # the description's link opens the CSV in the artifact view
        visible(page.get_by_role("link", name="metrics/per_class_test.csv", exact=True)).click()
    csv_page = opened.value
    visible(csv_page.get_by_role("cell", name="road", exact=True)).wait_for()
    csv_page.close()
    # Model metrics tab: the Summary/ copies form the first chart section, above test/*, train/*, val/*
    visible(page.get_by_role("tab", name="Model metrics", exact=True)).click()
    tops = {}
    for section in ("Summary", "test", "train", "val"):
        header = visible(page.get_by_text(section, exact=True))  # the section header: "{name} ({count})"
        header.wait_for()
        tops[section] = header.bounding_box()["y"]
    assert min(tops, key=tops.get) == "Summary", tops


def publish_screenshots(shots: dict[str, Path]) -> None:
    """Copy the parent-run and run-page screenshots to $STUDY_UI_SCREENSHOTS as palette PNGs."""
    target = os.environ.get("STUDY_UI_SCREENSHOTS")
    if not target:
        return
    from PIL import Image

    Path(target).mkdir(parents=True, exist_ok=True)
    for name in ("grid_parent", "run_page"):
        img = Image.open(shots[name]).convert("RGB").quantize(colors=64)
        img.save(Path(target) / f"{name}.png", optimize=True)


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
    per_class, best = per_class_rows(client, run.info.run_id, tmp_path)
    timings = {"grid": time.monotonic() - t0}
    shots = {name: tmp_path / f"ui_{name}.png" for name in ("experiment", "run", "artifacts", "grid_parent",
                                                            "run_page")}
    digest = data_fingerprint(load_grid(tmp_path / "ui.yaml").runs[0].spec.data)
    assert run.inputs.dataset_inputs[0].dataset.digest == digest

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

            check_run_metrics(page, ui_url(host, port, exp_id, run.info.run_id), run, shots["run"])
            check_per_class_preview(page, per_class, best, shots["artifacts"])

            # The report on the grid's parent run, and a run's description and dataset.
            page.set_viewport_size({"width": 1280, "height": 900})
            check_parent_run(page, ui_url(host, port, exp_id, run_ids["grid:ui"]), shots["grid_parent"])
            check_run_description(page, ui_url(host, port, exp_id, run.info.run_id), run, digest, shots["run_page"])
        except Exception:
            page.screenshot(path=tmp_path / "ui_failure.png")
            print(f"failure screenshot: {tmp_path / 'ui_failure.png'} (server log {tmp_path / 'server.log'})")
            raise
        finally:
            browser.close()
    timings["total"] = time.monotonic() - t0
    publish_screenshots(shots)
    for name, path in shots.items():
        assert path.stat().st_size > 10_000, path
        print(f"screenshot {name}: {path}")
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
