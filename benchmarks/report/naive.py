"""Section 3: against the naive merge."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.report.cells import Report
from benchmarks.report.cells import Run
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import gib
from benchmarks.report.cells import ratio
from benchmarks.report.cells import times_x


def _mem(run: Run) -> str:
    return f"host +{gib(run['host_extra'])}, device +{gib(run['device_extra'])}"


def naive(r: Report) -> list[str]:
    def cell(key: str, key1: str) -> Callable[[dict], str]:
        def fn(m: dict) -> str:
            run, one = m["runs"][key], m["runs"][key1]
            return f"{fmt_time(run)}; {_mem(run)} ({m['depth']} layers), {_mem(one)} (1 layer)"

        return fn

    rows = [
        r.row(
            "naive: the whole tree on the device, every full delta materialised at once, then added; no checks",
            "merge",
            cell("naive", "naive_depth1"),
        ),
        r.row(
            "engine in memory (`merge_params`, fp32 out, verification on)",
            "merge",
            cell("engine_mem_f32", "engine_mem_f32_depth1"),
        ),
        r.row(
            "**engine / naive**: time; peak extra host memory",
            "merge",
            lambda m: (
                f"{times_x(ratio(m['runs']['engine_mem_f32'], m['runs']['naive']))}; "
                f"{times_x(m['runs']['engine_mem_f32']['host_extra'] / m['runs']['naive']['host_extra'])}"
            ),
        ),
        r.row(
            "extra host memory per added layer: naive; engine",
            "merge",
            lambda m: (
                f"{gib(_per_layer(m, 'naive'))}; {gib(_per_layer(m, 'engine_mem_f32'))} "
                f"(merged output alone: {gib(m['adapted_params'] * 4 / m['depth'])})"
            ),
        ),
    ]
    intro = (
        "Peak extra memory: the highest resident set (host) or allocator peak (device; `n/a` where the backend keeps "
        "no statistics, as JAX's CPU backend, whose device memory is the host's) above the level before the call, "
        "inputs already in memory. Both return the merged fp32 tree in host memory, so both hold it at the end; "
        "the naive merge also holds every delta, so its extra memory grows twice as fast with depth."
    )
    return r.section("3. Against the naive merge", intro, rows)


def _per_layer(m: dict, key: str) -> float | None:
    if m["depth"] <= 1:
        return None
    return (m["runs"][key]["host_extra"] - m["runs"][f"{key}_depth1"]["host_extra"]) / (m["depth"] - 1)
