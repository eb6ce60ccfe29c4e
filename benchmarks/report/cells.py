"""The markdown of `scripts/benchmark.py`: one table per question, one column per device (CPU, accelerator).

Every figure comes from the sections' JSON; a section that did not run shows why in its cells.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import statistics
from typing import Any

Run = dict[str, Any]  # {"times": [s, ...], "host_extra": bytes | None, "device_extra": bytes | None, ...}


def median(run: Run) -> float:
    return statistics.median(run["times"])


def fmt_time(run: Run | None) -> str:
    if not run or not run.get("times"):
        return "-"
    ts = run["times"]
    return f"{statistics.median(ts):.3g} s ({min(ts):.3g}-{max(ts):.3g})"


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def ratio(a: Run | None, b: Run | None) -> float | None:
    if not a or not b or not a.get("times") or not b.get("times"):
        return None
    return median(a) / median(b)


def times_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def verdict(value: float, limit: float) -> str:
    return "met" if value <= limit else "**missed**"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Report:
    """Results per platform and section; `cols` are the column titles (one per platform)."""

    results: dict[str, dict[str, dict[str, Any]]]
    platforms: list[str]
    cols: list[str]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def cells(self, section: str, fn: Callable[[dict[str, Any]], str]) -> list[str]:
        out = []
        for plat in self.platforms:
            res = self.results[plat].get(section)
            if res is None:
                out.append("not run")
            elif "skipped" in res:
                out.append(f"skipped: {res['skipped']}")
            else:
                try:
                    out.append(fn(res))
                except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as e:
                    out.append(f"- ({type(e).__name__}: {e})")
        return out

    def row(self, label: str, section: str, fn: Callable[[dict[str, Any]], str]) -> list[str]:
        return [label, *self.cells(section, fn)]

    def both(self, fn: Callable[[dict[str, Any], dict[str, Any]], str]) -> list[str]:
        """Cells computed from the `merge` and `peft` results of the same platform."""
        out = []
        for plat in self.platforms:
            m, p = self.results[plat].get("merge"), self.results[plat].get("peft")
            if m is None and p is None:
                out.append("not run")
            elif m and p and "runs" in m and "runs" in p:
                out.append(fn(m, p))
            else:
                out.append("-")
        return out

    def section(self, title: str, intro: str, rows: list[list[str]], first: str = "measurement") -> list[str]:
        return [f"## {title}", "", intro, "", table([first, *self.cols], rows), ""]
