"""Section 6: serving, the merged model against the LoRA model."""

from __future__ import annotations

from benchmarks.report.cells import Report
from benchmarks.report.cells import fmt_time
from benchmarks.report.cells import ratio
from benchmarks.report.cells import times_x


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
