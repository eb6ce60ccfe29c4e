"""One-screen summary of a merge (rich table), as printed by the command line."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from openpi_merge_plugin.merge.report import MergeReport


def _fmt(x: float | None, spec: str = ".2e") -> str:
    return "-" if x is None else format(x, spec)


def render(report: MergeReport, *, title: str, console: Console | None = None, footer: list[str] | None = None) -> None:
    console = console or Console(width=max(Console().width, 132))
    table = Table(title=title, title_justify="left")
    for col, justify in [
        ("weight", "left"),
        ("exp", "right"),
        ("rank", "right"),
        ("alpha", "right"),
        ("scale", "right"),
        ("layers", "right"),
        ("||dW||/||W||", "right"),
        ("bf16 keeps", "right"),
        ("max rel err", "right"),
        ("dtype", "left"),
        ("s", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for w in sorted(report.weights, key=lambda w: (w.expert, w.path)):
        table.add_row(
            w.path.removeprefix("PaliGemma/llm/layers/"),
            str(w.expert),
            str(w.rank),
            f"{w.alpha:g}" + (" rs" if w.rslora else ""),
            f"{w.scale * w.strength:g}",
            str(max(len(w.delta_rel_norm), 1)),
            _fmt(w.delta_rel_norm_total, ".3e"),
            f"{100 * w.bf16_survival_total:.1f}%",
            _fmt(w.max_rel_err),
            f"{w.input_dtype}->{w.output_dtype}",
            f"{w.seconds:.2f}",
        )
    console.print(table)
    verdict = (
        f"verified: every merged layer matches the LoRA forward (max rel err {_fmt(report.max_rel_err)} "
        f"<= {report.tolerance:g})"
        if report.verified
        else "verification skipped (--no-verify)"
    )
    console.print(verdict)
    console.print(
        f"{len(report.weights)} weights merged, {len(report.removed_leaves)} LoRA leaves removed, "
        f"{report.passthrough_leaves} leaves passed through unchanged; "
        + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
    )
    for line in footer or []:
        console.print(line)
