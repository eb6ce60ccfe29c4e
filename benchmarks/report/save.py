"""Section 5: merge on save inside training."""

from __future__ import annotations

import statistics

from benchmarks.report.cells import Report
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import median
from benchmarks.report.cells import times_x


def _blocking(run: dict) -> str:
    first, b = run["blocking"][0], run["blocking"][1:]
    out = f"blocking per save {fmt_time({'times': b})}, first save {first:.3g} s"
    if run["merge_seconds"]:
        m = run["merge_seconds"]
        out += f"; the plugin's merge {fmt_time({'times': m[1:]})}, first {m[0]:.3g} s (compiles)"
    return out


def save(r: Report) -> list[str]:
    def with_merge(s: dict) -> str:
        total = median(s["without"]) + median(s["merged"])
        return f"{total:.3g} s: params save {median(s['without']):.3g} s + merged item {fmt_time(s['merged'])}"

    rows = [
        r.row(
            "save without merge: `PyTreeCheckpointer().save` of the params (openpi's `params` item), to completion",
            "save",
            lambda s: fmt_time(s["without"]),
        ),
        r.row(
            "save with merge: the same + the `merged` item (`checkpoint_merge.write_merge` of the live params)",
            "save",
            with_merge,
        ),
        r.row(
            "**with / without**",
            "save",
            lambda s: times_x((median(s["without"]) + median(s["merged"])) / median(s["without"])),
        ),
        r.row(
            "openpi `scripts/train.py debug_lora` (tiny model), merge on save", "train", lambda t: _blocking(t["merge"])
        ),
        r.row("the same, `--no-merge-lora-on-save`", "train", lambda t: _blocking(t["no_merge"])),
        r.row(
            "**with / without, blocking time per save** (after the first)",
            "train",
            lambda t: times_x(
                statistics.median(t["merge"]["blocking"][1:]) / statistics.median(t["no_merge"]["blocking"][1:])
            ),
        ),
    ]
    intro = (
        "Full-size layer shapes at the measured depth: the params as jax.Arrays on the device, saved as openpi's "
        "`params` item with and without the `merged` item (what `openpi_glue.merged_item` runs), both synchronous "
        "to completion. In training openpi saves `params` asynchronously (only the device-to-host copy blocks) while "
        "the merge blocks, so the merge adds its whole time to the save's blocking time; the real tiny training run "
        "shows that (Orbax's `checkpoint_manager_blocking_duration_secs`, per save, same run config)."
    )
    return r.section("5. Merge on save inside training", intro, rows)
