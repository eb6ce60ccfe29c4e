"""The terminal view of an inspection: one rich table row per adapted weight, then the checkpoint's facts."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from openpi_merge_plugin.checks.inspection import Inspection
from openpi_merge_plugin.checks.inspection import min_median_max


def fmt_rel(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def fmt_frac(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def title(ins: Inspection) -> str:
    what = "merged checkpoint" if ins.kind == "merged" else "LoRA checkpoint"
    return f"{what} {ins.path}" + (f" (step {ins.step})" if ins.step is not None else "")


def render(ins: Inspection, *, console: Console | None = None) -> None:
    """Prints the table and, for a merged checkpoint, its manifest, checksum status and serving config."""
    console = console or Console(width=max(Console().width, 160))
    table = Table(title=title(ins), title_justify="left")
    table.add_column("weight", no_wrap=True)
    for col in ("exp", "kind", "rank", "alpha", "rsLoRA", "scale", "layers"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for metric in ("||dW||/||W||", "bf16 keeps"):
        # The metric's name heads the median column only, which keeps the table within 150 characters.
        for stat in ("min", "median", "max"):
            table.add_column(f"{metric if stat == 'median' else ''}\n{stat}", justify="right")
    for w in ins.weights:
        rel, keep = min_median_max(w.delta_rel_norm), min_median_max(w.bf16_survival)
        table.add_row(
            w.name,
            str(w.expert),
            w.kind,
            str(w.rank),
            f"{w.alpha:g}",
            "yes" if w.rslora else "no",
            f"{w.scale:g}" + (f" x{w.strength:g}" if w.strength != 1.0 else ""),
            str(len(w.delta_rel_norm)),
            *(fmt_rel(rel[s]) for s in ("min", "median", "max")),
            *(fmt_frac(keep[s]) for s in ("min", "median", "max")),
        )
    console.print(table)
    for line in (
        "scale: what openpi multiplies the LoRA term by (attention: alpha/rank, or alpha/sqrt(rank) with rsLoRA; MLP: 1)",
        "||dW||/||W|| per layer; bf16 keeps: the fraction of ||dW|| left after storing W + dW in bfloat16",
    ):
        console.print(line, markup=False, highlight=False)
    for line in _facts(ins):
        console.print(line, markup=False, highlight=False)
    if ins.kind == "merged":
        line, style = _checksum_line(ins)
        console.print(line, style=style, markup=False, highlight=False)


def _facts(ins: Inspection) -> list[str]:
    experts = ins.lora_config.get("experts") or {}
    variants = ", ".join(f"expert {i}: {e.get('variant')}" for i, e in experts.items())
    lines = [f"LoRA config: {ins.lora_config.get('source', '?')}" + (f" ({variants})" if variants else "")]
    if ins.kind == "lora":
        lines.append(f"merged: {ins.serving.describe()}")
        return lines
    m = ins.manifest or {}
    source = m.get("source") or {}
    plugin = f"{m.get('plugin', '?')} {m.get('plugin_version', '?')}"
    merged_dtype = (m.get("dtype_policy") or {}).get("merged_weights", "?")
    strength = (m.get("options") or {}).get("strength", 1.0)
    verified = (
        f"verified (max rel err {m['max_rel_err']:.2e} <= {m.get('tolerance')})"
        if m.get("verified") and m.get("max_rel_err") is not None
        else "not verified"
    )
    lines += [
        f"merged from {source.get('step_dir', '?')} by {plugin} ({m.get('created_utc', '?')})",
        f"merged weights stored as {merged_dtype}, strength {strength:g}, {verified}",
        ins.serving.describe(),
    ]
    return lines


def _checksum_line(ins: Inspection) -> tuple[str, str | None]:
    c = ins.checksums
    if c is None:
        return "checksums: not checked", None
    if c.ok:
        return f"checksums: ok ({c.files} files match the manifest)", "green"
    problems = [
        f"{len(files)} {what} ({', '.join(files)})"
        for what, files in (("mismatched", c.mismatched), ("missing", c.missing), ("extra", c.extra))
        if files
    ]
    return f"checksums: FAILED: {'; '.join(problems)}", "bold red"
