"""The older whole-process table (`--sections cli`)."""

from __future__ import annotations

from benchmarks.report.cells import Report
from benchmarks.report.cells import table


def cli(r: Report) -> list[str]:
    res = r.results[r.platforms[0]].get("cli", {})
    if "rows" not in res:
        return ["## Whole process (CLI)", "", f"skipped: {res.get('skipped')}", ""]
    rows = [[name, f"{wall:.1f}", f"{rss / 2**30:.2f}"] for name, wall, rss in res["rows"]]
    head = ["merge", "wall time (s)", "peak RSS (GiB)"]
    return ["## Whole process (`openpi-merge-lora` under `/usr/bin/time -v`, CPU)", "", table(head, rows), ""]
