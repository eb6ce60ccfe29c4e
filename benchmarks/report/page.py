"""The whole markdown: the header, the machine's load, then one table per section."""

from __future__ import annotations

from typing import Any

from benchmarks.report.cells import Report
from benchmarks.report.cells import table
from benchmarks.report.cli import cli
from benchmarks.report.memory import memory
from benchmarks.report.merge import merge
from benchmarks.report.naive import naive
from benchmarks.report.peft import peft
from benchmarks.report.profile import profile
from benchmarks.report.save import save
from benchmarks.report.serving import serving
from benchmarks.report.targets import targets


def render(
    meta: dict[str, Any],
    results: dict[str, dict[str, dict[str, Any]]],
    platforms: list[str],
    load: list[dict[str, Any]] | None = None,
) -> str:
    machine = meta["machine"]
    cols = [f"CPU ({machine['cores']} cores)"]
    if meta["accelerator"]:
        cols.append(f"accelerator: {meta['accelerator']}")
    else:
        cols.append(f"accelerator: not run ({meta['accelerator_note']})")
        results["none"] = {}
        platforms = [*platforms, "none"]
    report = Report(results, platforms, cols, meta)
    parts = header(meta) + load_table(load or [])
    for part in (merge, peft, naive, memory, save, serving, profile, targets):
        parts += part(report)
    if "cli" in meta["sections"]:
        parts += cli(report)
    return "\n".join(parts).rstrip("\n") + "\n"


def header(meta: dict[str, Any]) -> list[str]:
    m, v = meta["machine"], meta["machine"]["versions"]
    lo_s, lo_e = m["load_start"], m["load_end"]
    busy = (
        f"; other processes using >= 10% of a core (over 1 s) at the start: {'; '.join(m['busy_start'])}"
        if m["busy_start"]
        else "; no other process used >= 10% of a core (over 1 s) at the start"
    )
    experts = "; ".join(
        f"{e['variant']}: width {e['width']}, mlp {e['mlp_dim']}, {e['num_heads']} heads / {e['num_kv_heads']} kv, "
        f"head dim {e['head_dim']}, LoRA rank {e['rank']} alpha {e['alpha']:g}"
        for e in meta["experts"]
    )
    accelerator = meta["accelerator"] or f"none ({meta['accelerator_note']})"
    openpi = f" (openpi from `{meta['openpi_python']}`)" if meta.get("openpi_python") else ""
    made = (
        f"Made by `{meta['command']}`{openpi} on {meta['started']} UTC. Times are the median (min-max) of "
        f"{meta['repeats']} runs after a warm-up run that compiles; ratios are of medians. Each section runs in a fresh process per "
        "device."
    )
    model = (
        f"- **Model**: {meta['sizes']}; {experts}. Merges use {meta['depth']} of the 18 LLM layers: the engine merges "
        "one layer slice at a time, so its time per layer and its memory do not depend on depth, which only scales "
        "the run time (what limits it on this machine). Bases bf16, adapters fp32, as openpi's LoRA training "
        "checkpoints hold them."
    )
    machine_line = (
        f"- **Machine**: {m['host']}, {m['cpu']}, {m['cores']} cores, {m['ram_gib']:.0f} GiB RAM; accelerator: "
        f"{accelerator}."
    )
    load_line = (
        f"- **Load**: load average (1/5/15 min) {lo_s[0]:.2f}/{lo_s[1]:.2f}/{lo_s[2]:.2f} at the start, "
        f"{lo_e[0]:.2f}/{lo_e[1]:.2f}/{lo_e[2]:.2f} at the end{busy}."
    )
    software_line = (
        f"- **Software**: Python {m['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}, "
        f"orbax-checkpoint {v['orbax-checkpoint']}, torch {v['torch']}, peft {v['peft']}."
    )
    updates = [
        f"Sections {', '.join(u['sections'])} measured again by `{u['command']}`"
        + (f" (openpi from `{u['openpi_python']}`)" if u.get("openpi_python") else "")
        + f" on {u['started']} UTC; load average {u['load_start'][0]:.2f} at the start, {u['load_end'][0]:.2f} at "
        "the end."
        for u in meta.get("updates", [])
    ]
    return [
        "# Benchmark: merging pi0 LoRA adapters",
        "",
        made,
        "",
        *(f"- {u}" for u in updates),
        *([""] if updates else []),
        machine_line,
        load_line,
        software_line,
        model,
        "",
    ]


def load_table(load: list[dict[str, Any]]) -> list[str]:
    """How busy the rest of the machine was while each section ran."""
    if not load:
        return []
    rows = [
        [
            f"{x['section']} ({x['platform']})",
            f"{x['seconds']:.0f} s",
            f"{x['others_cores_mean']:.2f} (max {x['others_cores_max']:.2f})",
            f"{x['loadavg_max']:.2f}",
        ]
        for x in load
    ]
    head = ["section", "wall time", "CPU used by other processes, cores: mean (max of 2 s samples)", "1-min load, max"]
    return ["Machine load while each section ran:", "", table(head, rows), ""]
