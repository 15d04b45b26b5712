"""A pytest plugin that records every case tried (docstring's first line) and its outcome, and prints a table."""

from __future__ import annotations

from pathlib import Path

AREAS = {"test_faults": "fault", "test_tracking_server": "fault", "test_launch": "fault (Slurm)",
         "test_load": "load", "test_launch_claims": "operate", "test_bad_input": "bad input", "test_safety": "safety"}


class Report:
    def __init__(self) -> None:
        self.cases: dict[str, dict] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            doc = (getattr(item, "function", None).__doc__ or item.name).strip().splitlines()[0].strip()
            param = getattr(item, "callspec", None)
            if param is not None:
                doc = f"{doc} [{param.id}]"
            self.cases[item.nodeid] = {"area": AREAS.get(Path(item.path).stem, Path(item.path).stem),
                                       "case": doc, "outcome": "not run", "seconds": 0.0, "detail": ""}

    def pytest_deselected(self, items) -> None:
        for item in items:
            if item.nodeid in self.cases:
                self.cases[item.nodeid]["outcome"] = "deselected"

    def pytest_runtest_logreport(self, report) -> None:
        row = self.cases.get(report.nodeid)
        if row is None:
            return
        row["seconds"] += report.duration
        for name, value in report.user_properties:
            row["detail"] = f"{name}: {value}"
        if hasattr(report, "wasxfail"):
            row["outcome"] = ("XFAIL: " + report.wasxfail) if report.skipped else "XPASS"
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            row["outcome"] = "SKIPPED: " + reason.removeprefix("Skipped: ")
        elif report.failed:
            row["outcome"] = "ERROR (setup)" if report.when == "setup" else ("FAILED" if report.when == "call"
                                                                             else "ERROR (teardown)")
        elif report.when == "call" and report.passed:
            row["outcome"] = "passed"

    def table(self) -> str:
        rows = list(self.cases.values())
        head = ("#", "area", "case", "outcome", "s")
        body = [(str(i + 1), r["area"], r["case"], r["outcome"], f"{r['seconds']:.1f}") for i, r in enumerate(rows)]
        widths = [max(len(x[k]) for x in [head, *body]) for k in range(len(head))]
        widths[3] = min(widths[3], 60)

        def line(cells):
            return " | ".join(c[:widths[k]].ljust(widths[k]) if k != 4 else c.rjust(widths[k])
                              for k, c in enumerate(cells)).rstrip()

        out = [line(head), "-+-".join("-" * w for w in widths)] + [line(b) for b in body]
        counts: dict[str, int] = {}
        for r in rows:
            key = r["outcome"].split(":")[0].split(" (")[0]
            counts[key] = counts.get(key, 0) + 1
        out.append("")
        out.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
                   f"; {sum(r['seconds'] for r in rows):.0f} s in tests")
        details = [f"  #{i + 1} {r['detail']}" for i, r in enumerate(rows) if r["detail"]]
        long = [f"  #{i + 1} {r['outcome']}" for i, r in enumerate(rows) if len(r["outcome"]) > widths[3]]
        if details or long:
            out.append("notes:")
            out += details + long
        return "\n".join(out)
