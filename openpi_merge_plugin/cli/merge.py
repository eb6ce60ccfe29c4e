"""`openpi-merge-lora [merge] STEP_DIR`: merge an openpi LoRA checkpoint into a serving-ready one."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import tyro

from openpi_merge_plugin import options
from openpi_merge_plugin.cli import progress as progress_bar
from openpi_merge_plugin.cli import summary
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.serving.names import ServingConfig


@dataclasses.dataclass
class Args:
    """Merge the LoRA adapters of an openpi checkpoint step into a plain checkpoint (default: STEP_DIR/merged)."""

    # openpi step directory, as written by scripts/train.py: <checkpoint_dir>/<step>/ (holds params/, assets/).
    step_dir: tyro.conf.Positional[pathlib.Path]
    # Where the LoRA config comes from (openpi records no alpha): --config, --lora-config or --alpha [--rslora].
    lora_source: tyro.conf.OmitArgPrefixes[checkpoint_merge.LoRASource] = dataclasses.field(
        default_factory=checkpoint_merge.LoRASource
    )
    # Where to write the merged checkpoint (default: STEP_DIR/merged).
    output: pathlib.Path | None = None
    # How to merge: --output-dtype, --strength, --no-verify, --tolerance, --allow-nonfinite, --seed.
    merge: tyro.conf.OmitArgPrefixes[options.MergeOptions] = dataclasses.field(default_factory=options.MergeOptions)
    # Replace an earlier output of this tool (or an empty directory; nothing else).
    overwrite: bool = False
    # Print the manifest as JSON instead of the table.
    json: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(self, {**options.SUBCOMMAND_CHECKS, "step_dir": options.ANY, "output": options.ANY})


def merge(args: Args) -> checkpoint_merge.CheckpointMergeResult:
    with progress_bar.slice_bar("merging", enabled=args.progress) as bar:
        return checkpoint_merge.merge_checkpoint(
            args.step_dir,
            output=args.output,
            lora=args.lora_source,
            options=args.merge,
            overwrite=args.overwrite,
            progress=bar.progress,
            on_plan=bar.on_plan,
        )


def run(args: Args) -> int:
    """Merges, then prints the summary table (or the manifest as JSON)."""
    result = merge(args)
    if args.json:
        print(json.dumps(result.manifest, indent=2))
        return 0
    serving = ServingConfig(result.manifest["serving_config"], result.manifest["serving_config_reason"])
    summary.render(
        result.report,
        title=f"merged {args.step_dir}",
        footer=[
            f"LoRA config: {result.manifest['lora_config']['source']}",
            f"output: {result.output}",
            serving.describe(),
        ],
    )
    return 0
