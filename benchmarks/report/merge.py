"""Section 1: merge throughput against a plain copy (the floor)."""

from __future__ import annotations

from benchmarks.report.cells import Report
from benchmarks.report.cells import Run
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import median
from benchmarks.report.cells import ratio
from benchmarks.report.cells import times_x


def _gbps(run: Run, nbytes: int) -> str:
    return f"{nbytes / median(run) / 1e9:.2f} GB/s"


def merge(r: Report) -> list[str]:
    def timed(label: str, key: str) -> list[str]:
        return r.row(
            label, "merge", lambda m: f"{fmt_time(m['runs'][key])}; {_gbps(m['runs'][key], m['adapted_params'] * 4)}"
        )

    def over(label: str, a: str, b: str) -> list[str]:
        return r.row(label, "merge", lambda m: times_x(ratio(m["runs"][a], m["runs"][b])))

    rows = [
        r.row(
            "merged weights",
            "merge",
            lambda m: (
                f"{m['adapted_params'] / 1e6:.0f} M params: {m['base_bytes'] / 1e9:.2f} GB bf16 in, "
                f"{m['adapted_params'] * 4 / 1e9:.2f} GB fp32 out"
            ),
        ),
        timed("floor, in memory: numpy `astype(float32)` of each bf16 base weight (host to host)", "floor_numpy"),
        timed(
            "floor, in memory: per layer slice host -> device, astype, device -> host (the engine's data path)",
            "floor_device",
        ),
        timed("engine, in memory: `merge_params`, fp32 out, verification on", "engine_mem_f32"),
        timed("engine, in memory: the same, verification off", "engine_mem_f32_noverify"),
        over("**engine / numpy floor, in memory** (target <= 1.5x)", "engine_mem_f32", "floor_numpy"),
        over("engine / data-path floor, in memory", "engine_mem_f32", "floor_device"),
        timed(
            "floor, on disk: Orbax read of each weight and its adapters, astype, streamed Orbax write in the engine's "
            "column pieces, checksums, fsync, commit",
            "floor_disk",
        ),
        timed("engine, on disk: `merge_checkpoint` (the same I/O + merge + verification + manifest)", "engine_disk"),
        over("**engine / floor, on disk** (target <= 1.5x)", "engine_disk", "floor_disk"),
    ]
    intro = (
        "GB/s: GB of merged (fp32) weights produced per second. Both sides handle exactly the adapted weights; in "
        "memory from host numpy arrays to host arrays, on disk from an openpi-style step directory (written just "
        "before, so both sides read from the page cache) to a committed, fsynced output."
    )
    return r.section("1. Merge throughput against a plain copy (the floor)", intro, rows)
