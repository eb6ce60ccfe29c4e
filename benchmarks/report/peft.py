"""Section 2: against PEFT."""

from __future__ import annotations

from benchmarks.report.cells import Report
from benchmarks.report.cells import Run
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import median
from benchmarks.report.cells import times_x


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
