"""The markdown of `scripts/benchmark.py`: one table per question, one column per device (CPU, accelerator).

Every figure comes from the sections' JSON; a section that did not run shows why in its cells.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import statistics
from typing import Any

LAYERS = "PaliGemma/llm/layers/"
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
    return [
        "# Benchmark: merging pi0 LoRA adapters",
        "",
        made,
        "",
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


def _per_param(run: Run, params: int) -> str:
    return f"{fmt_time(run)}; {median(run) / params * 1e9:.1f} ns/param"


def _engine_over_peft(m: dict, p: dict, key: str) -> float:
    return (median(m["runs"][key]) / m["adapted_params"]) / (median(p["runs"]["peft"]) / p["params"])


def peft(r: Report) -> list[str]:
    rows = [
        r.row(
            "PEFT `merge_and_unload()`: merges in the weight dtype (bf16 out), no checks",
            "peft",
            lambda p: _per_param(p["runs"]["peft"], p["params"]),
        ),
        r.row(
            "PEFT `merge_and_unload(safe_merge=True)` (adds a NaN check)",
            "peft",
            lambda p: _per_param(p["runs"]["peft_safe"], p["params"]),
        ),
    ]
    engine = (("engine_mem_bf16", "bf16 out"), ("engine_mem_f32", "fp32 out"))
    for key, label in engine:
        rows.append(
            r.row(
                f"engine `merge_params`, {label}, verification on",
                "merge",
                lambda m, key=key: _per_param(m["runs"][key], m["adapted_params"]),
            )
        )
    for key, label in engine:
        rows.append(
            [
                f"**engine ({label}) / PEFT, time per merged parameter** (target <= 1x)",
                *r.both(lambda m, p, key=key: times_x(_engine_over_peft(m, p, key))),
            ]
        )
    rows.append(
        r.row(
            "PEFT setup",
            "peft",
            lambda p: (
                f"torch {p['torch']} on {p['torch_device']}, {p['threads']} threads, peft {p['peft']}; "
                f"{p['params'] / 1e6:.0f} M params merged; weights {p['weight_dtype']}, adapters {p['adapter_dtype']}"
            ),
        )
    )
    intro = (
        "The PyTorch model has, per expert and layer, `nn.Linear`s with the adapted einsums' weight shapes (q: width "
        "-> heads x head_dim; k, v: width -> kv_heads x head_dim; out: heads x head_dim -> width; gate, up: width -> "
        "mlp; down: mlp -> width): the same parameter count, ranks and alphas as the JAX tree, LoRA on all of them "
        "(openpi's per-head q/kv/out adapters cost the same FLOPs as one adapter on the flattened matrix). Only "
        "`merge_and_unload` is timed, not wrapping the model or filling the adapters. PEFT adds the delta into the "
        "weight in place; the engine writes a new tree and checks every layer against the LoRA forward."
    )
    return r.section("2. Against PEFT", intro, rows)


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
            "streamed from memory (merge on save: `api.write_merged` of live params), measured depth",
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
            "save with merge: the same + the `merged` item (`api.write_merged` of the live params)", "save", with_merge
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


def serving(r: Report) -> list[str]:
    rows = []
    labels = {
        "prefix": "prefix pass (PaliGemma expert, {prefix_len} tokens, {prefix_depth} of {full_depth} layers)",
        "suffix": "suffix pass (action expert, {suffix_len} tokens + KV cache of {prefix_len}, {full_depth} layers)",
    }
    for which, label in labels.items():
        rows += [
            r.row(f"{which}: LoRA model", "serving", lambda s, w=which: fmt_time(s[w]["runs"]["lora"])),
            r.row(f"{which}: merged model", "serving", lambda s, w=which: fmt_time(s[w]["runs"]["merged"])),
            r.row(
                f"**{which}: speedup (LoRA / merged)**; max relative difference of the outputs",
                "serving",
                lambda s, w=which: (
                    f"{times_x(ratio(s[w]['runs']['lora'], s[w]['runs']['merged']))}; {s[w]['rel_diff']:.1e}"
                ),
            ),
            r.row(f"{which}: what runs", "serving", lambda s, label=label: label.format(**s)),
        ]
    intro = (
        "openpi's own `gemma.Module` (pi0's LLM, both experts), batch 1, the passes `Pi0.sample_actions` runs: one "
        "prefix pass that fills the KV cache, then one suffix pass per denoising step (10 by default). LoRA: "
        "`gemma_2b_lora` + `gemma_300m_lora` configs; merged: `gemma_2b` + `gemma_300m` with the engine's merged "
        "params. Same inputs; every param cast to bfloat16, as openpi's serving restores them."
    )
    return r.section("6. Serving: the merged model against the LoRA model", intro, rows)


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


def cli(r: Report) -> list[str]:
    res = r.results[r.platforms[0]].get("cli", {})
    if "rows" not in res:
        return ["## Whole process (CLI)", "", f"skipped: {res.get('skipped')}", ""]
    rows = [[name, f"{wall:.1f}", f"{rss / 2**30:.2f}"] for name, wall, rss in res["rows"]]
    head = ["merge", "wall time (s)", "peak RSS (GiB)"]
    return ["## Whole process (`openpi-merge-lora` under `/usr/bin/time -v`, CPU)", "", table(head, rows), ""]
