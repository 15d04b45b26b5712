"""Ratio benchmarks of the study (not part of the test run): ``python -m benchmarks``.

Each module has ``run(quick: bool) -> list[Row]``; ``BENCHMARKS`` maps the ``--only`` name to it.
Results and the machine they came from: ``benchmarks/README.md``.
"""

BENCHMARKS: dict[str, str] = {
    "recall_loss": "recall_loss",
    "confusion": "confusion",
    "data_loading": "data_loading",
    "harness": "harness",
    "grid": "grid_plan",
    "collect": "collect",
    "memory": "memory",
    "weak_losses": "weak_losses",
}
