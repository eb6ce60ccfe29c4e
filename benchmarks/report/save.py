"""Section 5: merge on save inside training."""

from __future__ import annotations

import statistics

from benchmarks.report.cells import Report
from benchmarks.report.cells import gib
from benchmarks.report.cells import times_x
from benchmarks.report.cells import verdict


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3g} s" + (f" ({min(xs):.3g}-{max(xs):.3g})" if len(xs) > 1 else "")


def _save(run: dict) -> str:
    host = max(run["host"]) if None not in run["host"] else None
    out = f"blocks {_spread(run['blocking'])}; committed after {_spread(run['wall'])}; host +{gib(host)}"
    device = run.get("device") or [None]
    return out if None in device else f"{out}; device peak +{gib(max(device))}"


def _ratio(model: str, a: str, b: str, key: str = "blocking"):
    return lambda s: times_x(statistics.median(s[model][a][key]) / statistics.median(s[model][b][key]))


def _target(model: str, limit: float):
    def cell(s: dict) -> str:
        x = statistics.median(s[model]["async"]["blocking"]) / statistics.median(s[model]["without"]["blocking"])
        return f"{times_x(x)}: {verdict(x, limit)}"

    return cell


def _train(run: dict) -> str:
    out = f"waits {_spread(run['blocking'])} per save after a run's first; first save {_spread(run['first'])}"
    if run["waits"]:
        out += f"; {len(run['waits'])} saves waited for the previous merge ({_spread(run['waits'])})"
    if run["merge_seconds"]:
        out += f"; each merge {_spread(run['merge_seconds'])} (after a run's first, which compiles)"
    return out + f"; runs {_spread(run['wall'])}"


def _median_ratio(t: dict, a: str) -> float:
    return statistics.median(t[a]["blocking"]) / statistics.median(t["no_merge"]["blocking"])


def _train_ratio(a: str):
    return lambda t: times_x(_median_ratio(t, a))


def save(r: Report) -> list[str]:
    rows = []
    for model, label in (("layers", "LLM layers"), ("whole", "whole tree")):

        def depth(s: dict, model: str = model) -> str:
            m = s[model]
            step = "a train step donating the params after each save" if m["train_step"] else "no train step"
            return f"{m['what']}, {m['depth']} layers: {m['params_bytes'] / 1e9:.2f} GB of params; {step}"

        def run(name: str, model: str = model):
            return lambda s: _save(s[model][name])

        rows += [
            r.row(f"**{label}**: the model saved", "merge_on_save", depth),
            r.row(f"{label}: openpi's save without the merged item", "merge_on_save", run("without")),
            r.row(f"{label}: with the merged item, async (default), float32 output", "merge_on_save", run("async")),
        ]
        if model == "layers":
            rows.append(
                r.row(
                    f"{label}: the same, the host copy a real copy (as an accelerator host holds it)",
                    "merge_on_save",
                    run("async_real_copy"),
                )
            )
        if model == "whole":
            rows.append(r.row(f"{label}: the same, bfloat16 output", "merge_on_save", run("async_bf16")))
        rows += [
            r.row(
                f"{label}: with the merged item, `--merge-lora.mode blocking`, float32 output",
                "merge_on_save",
                run("blocking"),
            ),
            r.row(
                f"**{label}: async / without, time the save blocks** (target <= 2x)",
                "merge_on_save",
                _target(model, 2.0),
            ),
            r.row(
                f"{label}: blocking mode / without, time the save blocks",
                "merge_on_save",
                _ratio(model, "blocking", "without"),
            ),
            r.row(
                f"{label}: async / without, save start to commit",
                "merge_on_save",
                _ratio(model, "async", "without", "wall"),
            ),
        ]
    rows += [
        r.row(
            "LLM layers, 1 layer, 10 saves each (the same leaves): time the save blocks, without / async",
            "merge_on_save",
            lambda s: (
                f"{_spread(s['overhead']['without']['blocking'])} / {_spread(s['overhead']['async']['blocking'])}"
            ),
        ),
        r.row(
            "**1 layer, 10 saves each: async / without, time the save blocks** (what the merged item adds)",
            "merge_on_save",
            _target("overhead", 2.0),
        ),
        r.row(
            "openpi `scripts/train.py debug_lora` (tiny model), merge on save, async (default)",
            "train",
            lambda t: _train(t["async"]),
        ),
        r.row("the same, `--merge-lora.mode blocking`", "train", lambda t: _train(t["blocking"])),
        r.row("the same, `--no-merge-lora-on-save`", "train", lambda t: _train(t["no_merge"])),
        r.row(
            "**async / no merge, the loop's wait per save** (after a run's first; target <= 1.25x)",
            "train",
            lambda t: f"{_train_ratio('async')(t)}: {verdict(_median_ratio(t, 'async'), 1.25)}",
        ),
        r.row("blocking mode / no merge, the loop's wait per save", "train", _train_ratio("blocking")),
    ]
    intro = (
        "The save path of a training run at full size (section `merge_on_save`): an Orbax CheckpointManager with "
        "openpi's items and options, the plugin's `merged` item added by its save hook, the params as jax.Arrays on "
        "the device; for the LLM layers, after the save returns, one train step donates the params' buffers, as "
        "openpi's does (not for the whole tree: on a CPU backend the device memory is the host's, and 24 GiB cannot "
        "hold the params, Orbax's write of them and a second set of params at once); then the commit is awaited. "
        "'blocks': how long `save` held the loop; 'committed after': save start to commit; 'host': peak resident "
        "memory above the level before the save (the params already resident). Async mode blocks for a host copy "
        "of the params: on a CPU backend that is the device buffers themselves (zero-copy, as Orbax's own copy of "
        "`params` is), so it costs memory only once training replaces the params (the train step then allocates "
        "new buffers instead of reusing the donated ones, as it does while Orbax writes `params`); on an "
        "accelerator host it is one more device-to-host copy of the params, held in host memory until the merge is "
        "written ('model saved' gives its size). On an accelerator (the same command runs every section there too "
        "when JAX sees one: random weights, nothing to download) each cell also says how far the save raised the "
        "device's peak memory. Then openpi's own `scripts/train.py` on a tiny LoRA config "
        "(section `train`, saves every 10 steps; two runs of each kind, taking turns): each `save_state` call timed "
        "from outside, whatever happens inside (the merge, a wait for the previous one, Orbax's wait for its "
        "previous save)."
    )
    return r.section("5. Merge on save inside training", intro, rows)
