"""`openpi-merge-lora inspect DIR`: what a LoRA step or a merged checkpoint holds, as a table, JSON or a picture."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys

import tyro

from openpi_merge_plugin import options
from openpi_merge_plugin.checks import inspection
from openpi_merge_plugin.cli import inspect_plot
from openpi_merge_plugin.cli import inspect_table
from openpi_merge_plugin.cli import progress as progress_bar
from openpi_merge_plugin.pipeline import checkpoint_merge


@dataclasses.dataclass
class Args:
    """Show each adapted weight's rank, alpha, scale, ||dW||/||W|| per layer and what bfloat16 keeps of it.

    Exits 1 if a merged checkpoint's files do not match the checksums in its manifest.
    """

    # An openpi LoRA step directory (holds params/) or a merged checkpoint (holds manifest.json).
    path: tyro.conf.Positional[pathlib.Path]
    # LoRA step only: where its LoRA config comes from (--config, --lora-config or --alpha [--rslora]).
    lora_source: tyro.conf.OmitArgPrefixes[checkpoint_merge.LoRASource] = dataclasses.field(
        default_factory=checkpoint_merge.LoRASource
    )
    # Also draw heat maps of ||dW||/||W|| and of the bf16-surviving fraction per (layer, weight) to this file.
    plot: pathlib.Path | None = None
    # Replace an existing --plot picture, if this command drew it and it is unchanged since (nothing else).
    overwrite: bool = False
    # Print the numbers as JSON instead of the table.
    json: bool = False
    # Merged checkpoint only: re-hash every file and compare with the manifest (reads the whole checkpoint).
    checksums: bool = True
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                **options.SUBCOMMAND_CHECKS,
                "path": options.ANY,
                "plot": options.optional(inspect_plot.plot_suffix),
                "checksums": options.ANY,
            },
        )


def inspect(args: Args) -> inspection.Inspection:
    lora = args.lora_source if args.lora_source.given else None
    with progress_bar.slice_bar("inspecting", enabled=args.progress) as bar:
        return inspection.inspect_checkpoint(
            args.path, lora=lora, checksums=args.checksums, progress=bar.progress, on_plan=bar.on_plan
        )


def run(args: Args) -> int:
    """Inspects, then prints the table (or JSON) and writes the picture if asked."""
    if args.plot is not None:
        inspect_plot.check_can_plot(args.plot, inspected=args.path, overwrite=args.overwrite)
    result = inspect(args)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        inspect_table.render(result)
    if args.plot is not None:
        inspect_plot.save(result, args.plot, overwrite=args.overwrite)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if result.checksums is None or result.checksums.ok else 1
