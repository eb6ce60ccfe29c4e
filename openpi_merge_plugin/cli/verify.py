"""`openpi-merge-lora verify MERGED_DIR`: re-check a merged checkpoint against its manifest and its LoRA step."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text
import tyro

from openpi_merge_plugin import options
from openpi_merge_plugin.checks import integrity
from openpi_merge_plugin.pipeline import checkpoint_merge


@dataclasses.dataclass
class Args:
    """Re-check a merged checkpoint: files and params against its manifest, merged layers against the LoRA step."""

    # Merged checkpoint directory, as written by `openpi-merge-lora` (holds manifest.json, params/).
    merged_dir: tyro.conf.Positional[pathlib.Path]
    # LoRA step to re-run the layer equivalence check against (default: the step the manifest records, if it
    # still exists; otherwise that check is skipped).
    lora_step: pathlib.Path | None = None
    # Re-run the layer equivalence check against the LoRA step (--no-lora: files and structure only).
    lora: bool = True
    # The LoRA config to check against (--config, --lora-config or --alpha [--rslora]); default: the manifest's.
    lora_source: tyro.conf.OmitArgPrefixes[checkpoint_merge.LoRASource] = dataclasses.field(
        default_factory=checkpoint_merge.LoRASource
    )
    # Largest allowed relative error per layer (default: the manifest's); bfloat16 weights get their rounding on top.
    tolerance: float | None = None
    # Print the result as JSON instead of the table.
    json: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                **options.SUBCOMMAND_CHECKS,
                "merged_dir": options.ANY,
                "lora_step": options.ANY,
                "lora": options.ANY,
                "tolerance": options.optional(options.MERGE_OPTION_CHECKS["tolerance"]),
            },
        )


def verify(args: Args) -> integrity.VerifyResult:
    lora = args.lora_source if args.lora_source.given else None
    bars: dict[str, object] = {}

    def progress(stage: str, n: int, total: int) -> None:
        if not args.progress:
            return
        import tqdm

        if stage not in bars:
            for bar in bars.values():  # one stage at a time: hashing, then checking
                bar.close()  # type: ignore[attr-defined]
            unit = {"hashing": "B", "checking": "slice"}.get(stage, "it")
            bars[stage] = tqdm.tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=stage, file=sys.stderr)
        bars[stage].update(n)  # type: ignore[attr-defined]

    try:
        return integrity.verify_merged(
            args.merged_dir,
            args.lora_step,
            equivalence=args.lora,
            lora=lora,
            tolerance=args.tolerance,
            progress=progress,
        )
    finally:
        for bar in bars.values():
            bar.close()  # type: ignore[attr-defined]


def run(args: Args) -> int:
    """Verifies, prints the report (or JSON); 0 when every check passed, 1 otherwise."""
    result = verify(args)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render(result)
    return 0 if result.ok else 1


def render(result: integrity.VerifyResult, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 132))
    table = Table(title=f"verify {result.merged_dir}", title_justify="left")
    table.add_column("check")
    table.add_column("status")
    table.add_column("detail")
    style = {"ok": "green", "failed": "bold red", "skipped": "yellow"}
    for check in result.checks:
        table.add_row(check.name, Text(check.status, style=style[check.status]), Text(check.detail))
    console.print(table)
    lines = [] if result.lora_step is None else [f"LoRA step: {result.lora_step}", f"LoRA config: {result.lora_config}"]
    lines += [f"  - {problem}" for problem in result.problems]
    if result.ok:
        lines.append(f"ok: {result.merged_dir} checks out")
    else:
        n = len(result.problems)
        lines.append(f"FAILED: {n} problem{'s' if n != 1 else ''} in {result.merged_dir}")
    for line in lines:  # plain text, one line each: scripts and tests grep for them
        console.print(line, markup=False, highlight=False, soft_wrap=True)
