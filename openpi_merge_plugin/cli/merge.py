"""`openpi-merge-lora [merge] STEP_DIR`: merge an openpi LoRA checkpoint into a serving-ready one."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Literal

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
    # Registered openpi TrainConfig the checkpoint was trained with (needs openpi installed).
    config: str | None = None
    # JSON file with the LoRA config of each expert (see configs/), when openpi is not installed.
    lora_config: pathlib.Path | None = None
    # One LoRA alpha for every adapter (ranks are read from the checkpoint).
    alpha: float | None = None
    # With --alpha: the adapters were trained with rsLoRA (scale alpha/sqrt(rank)).
    rslora: bool = False
    # Where to write the merged checkpoint (default: STEP_DIR/merged).
    output: pathlib.Path | None = None
    # dtype of merged weights; other leaves always keep theirs.
    output_dtype: Literal["float32", "bfloat16", "preserve"] = "float32"
    # Multiplier on the LoRA term (1.0 reproduces the trained model).
    strength: float = 1.0
    # Check every merged layer against openpi's LoRA forward.
    verify: bool = True
    # Largest allowed relative error of the verification.
    tolerance: float = 1e-4
    # Merge even if adapters or merged weights contain NaN/Inf.
    allow_nonfinite: bool = False
    # Replace an existing output.
    overwrite: bool = False
    # Print the manifest as JSON instead of the table.
    json: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                "step_dir": options.ANY,
                **options.LORA_SOURCE_CHECKS,
                "output": options.ANY,
                **{k: v for k, v in options.MERGE_OPTION_CHECKS.items() if k != "seed"},
                "overwrite": options.ANY,
                "json": options.ANY,
                "progress": options.ANY,
            },
        )
        self.lora_source(), self.merge_options()  # their own cross-field checks

    def lora_source(self) -> checkpoint_merge.LoRASource:
        return checkpoint_merge.LoRASource(
            config=self.config, lora_config=self.lora_config, alpha=self.alpha, rslora=self.rslora
        )

    def merge_options(self) -> options.MergeOptions:
        return options.MergeOptions(
            output_dtype=self.output_dtype,
            strength=self.strength,
            verify=self.verify,
            tolerance=self.tolerance,
            allow_nonfinite=self.allow_nonfinite,
        )


def merge(args: Args) -> checkpoint_merge.CheckpointMergeResult:
    with progress_bar.slice_bar("merging", enabled=args.progress) as bar:
        return checkpoint_merge.merge_checkpoint(
            args.step_dir,
            output=args.output,
            lora=args.lora_source(),
            options=args.merge_options(),
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
