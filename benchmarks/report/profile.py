"""Where the engine's time goes: the kernel profile and the time by weight."""

from __future__ import annotations

from benchmarks.report.cells import Report
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import gib

LAYERS = "PaliGemma/llm/layers/"


def profile(r: Report) -> list[str]:
    labels: list[str] = []
    for plat in r.platforms:
        prof = r.results[plat].get("merge", {}).get("profile")
        if prof:
            labels = [p["label"] for p in prof[:-1]]
            break
    rows = [
        r.row(
            "largest layer slice",
            "merge",
            lambda m: f"`{m['profile'][-1]['path'].removeprefix(LAYERS)}` {m['profile'][-1]['shape']}",
        )
    ]

    def part(m: dict, i: int) -> str:
        run, sl = m["profile"][i], m["largest_slice_f32_bytes"]
        host = (
            ""
            if run["host_extra"] is None
            else f"; host +{gib(run['host_extra'])} = {run['host_extra'] / sl:.1f} slices"
        )
        dev = "" if run["device_extra"] is None else f"; device +{gib(run['device_extra'])}"
        return fmt_time(run) + host + dev

    for i, label in enumerate(labels):
        rows.append(r.row(label, "merge", lambda m, i=i: part(m, i)))

    def by_weight(m: dict) -> str:
        total = sum(w["seconds"] for w in m["weights"])
        top = sorted(m["weights"], key=lambda w: -w["seconds"])[:3]
        return "; ".join(
            f"`{w['path'].removeprefix(LAYERS)}` {w['seconds']:.2f} s ({w['seconds'] / total:.0%}, "
            f"{w['seconds'] / w['params'] * 1e9:.1f} ns/param)"
            for w in top
        )

    rows.append(r.row("the engine's time by weight (`MergeReport`, one in-memory run; top 3)", "merge", by_weight))
    intro = (
        "The largest layer slice, already on the device: the engine's merge of it (column pieces of at most 8 MiB on "
        "CPU, each one `slice_ops.merge_slice` call), then one kernel call on the whole slice, then each of its "
        "parts compiled and timed alone, with its peak extra memory (slices: fp32 slices of this weight). Each "
        "part makes its own pass over the slice, so the parts do not add up to the whole; they show what each pass "
        "costs."
    )
    return r.section("Where the engine's time goes", intro, rows, first="part")
