"""Section 4: peak extra memory of the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from benchmarks.report.cells import Report
from benchmarks.report.cells import Run
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import gib
from benchmarks.report.cells import ratio


def _fraction(run: Run, res: dict, tree_key: str = "tree_bytes") -> str:
    s, tree = res["largest_slice_f32_bytes"], res[tree_key]
    host, dev = run["host_extra"], run["device_extra"]
    out = f"host +{gib(host)} = {host / tree:.2f} x model = {host / s:.1f} slices"
    if dev is not None:
        out += f"; device +{gib(dev)} = {dev / tree:.2f} x model = {dev / s:.1f} slices"
    return out


def _growth(s: dict, suffix: str = "") -> float:
    """Extra host memory of the streamed merge per layer added (from `memory_depth` to twice that)."""
    return (s[f"merged_more{suffix}"]["host_extra"] - s[f"merged_mem{suffix}"]["host_extra"]) / s["memory_depth"]


def _save_results(r: Report) -> dict[str, Any]:
    """The `save` section's results of the first platform that ran it ({} if none did)."""
    return next((res for p in r.platforms if "host_buffer_mib" in (res := r.results[p].get("save", {}))), {})


def _buffer_label(r: Report) -> str:
    """The default write buffer the run measured (`orbax_stream.MAX_INFLIGHT_BYTES`), as text."""
    mib = _save_results(r).get("host_buffer_mib")
    return "default" if mib is None else f"default {mib} MiB"


def _buffer_rows(r: Report) -> list[list[str]]:
    """One row per write buffer size measured at the memory depth: merge time and peak extra host memory."""
    save = _save_results(r)
    sizes, default = list(save.get("buffer_sweep", {})), save.get("host_buffer_mib")

    def cell(mib: str) -> Callable[[dict], str]:
        def fn(s: dict) -> str:
            run = s["buffer_sweep"][mib]
            base = s["buffer_sweep"][str(default)]
            return (
                f"{s['memory_depth']} layers: {fmt_time(run)}, {ratio(run, base):.2f}x the default's time; "
                f"host +{gib(run['host_extra'])}"
            )

        return fn

    label = {"0": "none", str(default): f"{default} MiB (default)"}
    return [
        r.row(f"write buffer: {label.get(m, f'{m} MiB')}; merge time, extra memory", "save", cell(m)) for m in sizes
    ]


def memory(r: Report) -> list[str]:
    full = r.meta.get("pi0_params_bytes")

    def of_pi0(s: dict) -> str:
        extra = max(s["merged_mem"]["host_extra"], s["merged_more"]["host_extra"])
        return f"{gib(extra)} = {extra / full:.3f} of {full / 1e9:.1f} GB" if full else "-"

    rows = [
        r.row("one fp32 layer slice of the largest weight", "save", lambda s: gib(s["largest_slice_f32_bytes"])),
        r.row(
            "streamed from memory (merge on save: `checkpoint_merge.write_merge` of live params), measured depth",
            "save",
            lambda s: f"{s['memory_depth']} layers: {_fraction(s['merged_mem'], s, 'tree_bytes_mem')}",
        ),
        r.row(
            "the same at twice the depth",
            "save",
            lambda s: f"{2 * s['memory_depth']} layers: {_fraction(s['merged_more'], s, 'tree_bytes_more')}",
        ),
        r.row(
            "**growth per added layer** (streamed from memory)",
            "save",
            lambda s: f"{gib(_growth(s))} = {_growth(s) / s['largest_slice_f32_bytes']:.2f} slices",
        ),
        r.row("the larger of the two, against pi0's whole LoRA checkpoint (all 18 layers, every leaf)", "save", of_pi0),
        r.row(
            "streamed from memory with no write buffer (`host_buffer_mib=0`): the engine alone, measured depth",
            "save",
            lambda s: f"{s['memory_depth']} layers: {_fraction(s['merged_mem_nobuffer'], s, 'tree_bytes_mem')}",
        ),
        r.row(
            "the same at twice the depth",
            "save",
            lambda s: f"{2 * s['memory_depth']} layers: {_fraction(s['merged_more_nobuffer'], s, 'tree_bytes_more')}",
        ),
        r.row(
            "**growth per added layer** (no write buffer)",
            "save",
            lambda s: (
                f"{gib(_growth(s, '_nobuffer'))} = {_growth(s, '_nobuffer') / s['largest_slice_f32_bytes']:.2f} slices"
            ),
        ),
        *_buffer_rows(r),
        r.row(
            "streamed from disk (`merge_checkpoint`; reads a base weight a layer slice at a time)",
            "merge",
            lambda m: _fraction(m["runs"]["engine_disk"], m),
        ),
        r.row(
            "in memory (`merge_params`; returns, so holds, the whole fp32 tree)",
            "merge",
            lambda m: _fraction(m["runs"]["engine_mem_f32"], m),
        ),
    ]
    intro = (
        "Above the level before the merge, its input already in memory (host; device where the backend reports it). "
        "'x model': fraction of the bytes of the tree being merged (bf16 bases + fp32 adapters at that depth); "
        "'slices': fp32 layer slices of the largest weight. Target: one slice plus a fixed overhead, so no growth "
        f"with depth. The streamed writer's {_buffer_label(r)} write buffer (`host_buffer_mib`) lets written "
        "data wait for TensorStore, by design, to overlap writing with merging; the depths are chosen so "
        "that it fills. TensorStore holds that data (not a copy: pieces are handed over as Orbax hands over arrays) "
        "and its zstd output meanwhile, so the buffer costs up to about twice its size; with no buffer the rows "
        "below show the engine's own memory, and the buffer rows what other sizes cost and buy (two runs per size, "
        "the sizes taking turns: median time, larger peak). The depth rows are one run each, in one process: the "
        "allocator makes single peaks vary by ~0.1 GiB. From disk, the merge reads a base "
        "weight a layer slice at a time through a cache of its own: a chunk holding several layers (a training run "
        "on one device writes each weight as one zstd chunk up to 2 GiB) is decoded once, and no whole copy of the "
        "weight is made, where Orbax's restore holds the decoded chunk and a copy of it at once."
    )
    return r.section("4. Peak extra memory of the engine", intro, rows, first="merge path")
