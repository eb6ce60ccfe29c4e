"""The targets: met or missed, from the sections' figures."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.report.cells import Report
from benchmarks.report.cells import gib
from benchmarks.report.cells import ratio
from benchmarks.report.cells import times_x
from benchmarks.report.cells import verdict
from benchmarks.report.memory import _buffer_label
from benchmarks.report.memory import _growth
from benchmarks.report.peft import _engine_over_peft


def targets(r: Report) -> list[str]:
    def floor(a: str, b: str) -> Callable[[dict], str]:
        def cell(m: dict) -> str:
            x = ratio(m["runs"][a], m["runs"][b])
            return f"{times_x(x)}: {verdict(x, 1.5)}"

        return cell

    def vs_peft(m: dict, p: dict) -> str:
        x = _engine_over_peft(m, p, "engine_mem_bf16")
        y = _engine_over_peft(m, p, "engine_mem_f32")
        return f"{times_x(x)} with bf16 out: {verdict(x, 1.0)} ({times_x(y)} with fp32 out)"

    def bounded(suffix: str, buffer_mib: int) -> Callable[[dict], str]:
        # 'Fixed overhead': the write buffer as TensorStore holds it (up to twice its size, see section 4) + 256 MiB
        # of runtime; growth counted as noise below a tenth of a slice per layer.
        def cell(s: dict) -> str:
            sl = s["largest_slice_f32_bytes"]
            at, more = s[f"merged_mem{suffix}"]["host_extra"], s[f"merged_more{suffix}"]["host_extra"]
            allowed = sl + (2 * buffer_mib + 256) * 2**20
            ok = max(at, more) <= allowed and _growth(s, suffix) <= 0.1 * sl
            budget = f"one slice + 2 x {buffer_mib} MiB buffer + 256 MiB" if buffer_mib else "one slice + 256 MiB"
            return (
                f"{'met' if ok else '**missed**'}: {gib(at)} at {s['memory_depth']} layers, {gib(more)} at "
                f"{2 * s['memory_depth']} (host, streamed from memory) against {budget} = {gib(allowed)}; "
                f"{gib(_growth(s, suffix))} more per added layer ({_growth(s, suffix) / sl:.2f} slices)"
            )

        return cell

    rows = [
        r.row("1. merge <= 1.5x the floor, in memory", "merge", floor("engine_mem_f32", "floor_numpy")),
        r.row("1. merge <= 1.5x the floor, on disk", "merge", floor("engine_disk", "floor_disk")),
        ["2. no slower than PEFT per merged parameter, while verifying", *r.both(vs_peft)],
        r.row(
            "4. extra memory <= one layer slice + a fixed overhead, engine alone (no write buffer)",
            "save",
            bounded("_nobuffer", 0),
        ),
        r.row(
            f"4. the same with the {_buffer_label(r)} write buffer (see section 4)",
            "save",
            lambda s: bounded("", s["host_buffer_mib"])(s),
        ),
    ]
    return r.section("Targets", "Medians; details in the sections above.", rows, first="target")
