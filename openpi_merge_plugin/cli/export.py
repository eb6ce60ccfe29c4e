"""`openpi-merge-lora export SRC --format pytorch`: openpi's PyTorch checkpoint of a merged checkpoint or LoRA step."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import tyro

from openpi_merge_plugin import options
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import pytorch_export


@dataclasses.dataclass
class Args:
    """Write `model.safetensors` + `config.json` + `assets/` + `manifest.json`, as openpi's PyTorch runtime loads."""

    # A merged checkpoint (<step>/merged) or a LoRA step directory (merged on the way, streamed, verified).
    src: tyro.conf.Positional[pathlib.Path]
    # Output format. pytorch: openpi's PI0Pytorch state dict (pi0 and pi0.5; pi0-FAST has no PyTorch model).
    format: Literal["pytorch"] = "pytorch"
    # Tensor dtype, as upstream's converter: bfloat16 rounds every tensor; float32 keeps exact values for the
    # parameters PI0Pytorch holds in float32 (and for all of them when the config's model dtype is float32).
    precision: pytorch_export.Precision = "float32"
    # Output directory (default: <step>/merged_pytorch for a LoRA step, <merged>_pytorch beside a merged directory).
    output: pathlib.Path | None = None
    # Registered openpi TrainConfig: the model config, and for a LoRA step its LoRA config (needs openpi); default:
    # the openpi config the merge records. For a LoRA step without openpi: --lora-config or --alpha [--rslora].
    lora_source: tyro.conf.OmitArgPrefixes[checkpoint_merge.LoRASource] = dataclasses.field(
        default_factory=checkpoint_merge.LoRASource
    )
    # Without openpi: the model's action horizon (config.json); the variants are those the merge records.
    action_horizon: int | None = None
    # Without openpi: Pi0Config.dtype, which decides which params PI0Pytorch rounds to bfloat16.
    model_dtype: pytorch_export.Precision = "bfloat16"
    # Replace an earlier export (an empty directory, or an output of this tool; nothing else).
    overwrite: bool = False
    # Write a model whose SigLIP, vocabulary or projector dimensions differ from those PI0Pytorch hard-codes (it then
    # loads only into a PI0Pytorch built with them); the manifest lists them.
    allow_nonstandard_dims: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                **options.SUBCOMMAND_CHECKS,
                "src": options.ANY,
                "format": options.one_of(("pytorch",)),
                "precision": options.one_of(pytorch_export.Precision),
                "output": options.ANY,
                "action_horizon": options.optional(options.positive_int),
                "model_dtype": options.one_of(pytorch_export.Precision),
                "allow_nonstandard_dims": options.ANY,
            },
        )
        if self.lora_source.config and self.action_horizon is not None:
            raise ConfigError("--config and --action-horizon are alternatives: give one")


def run(args: Args) -> int:
    """Exports; prints where, and the manifest's verification line."""
    config = args.lora_source.config
    model = pytorch_export.model_info_from_openpi(config) if config else None
    bar = None

    def progress(stage: str, n: int, total: int) -> None:
        nonlocal bar
        if not args.progress:
            return
        import tqdm

        if bar is None:
            bar = tqdm.tqdm(total=total, unit="tensor", desc="export", file=sys.stderr)
        bar.update(n - bar.n)

    try:
        result = pytorch_export.export_pytorch(
            args.src,
            output=args.output,
            precision=args.precision,
            model=model,
            action_horizon=args.action_horizon,
            model_dtype=args.model_dtype,
            lora=args.lora_source if args.lora_source.given else None,
            overwrite=args.overwrite,
            allow_nonstandard_dims=args.allow_nonstandard_dims,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    m = result.manifest
    file_check = m["verification"]["file"]
    print(f"exported {m['tensors']} tensors ({m['precision']}) to {result.output}")
    print(f"read back with {file_check['reader']}: {file_check['tensors_checked']} tensors bitwise as laid out")
    if m["nonstandard_dims"]:
        print(
            f"dimensions PI0Pytorch does not hard-code (--allow-nonstandard-dims): {', '.join(m['nonstandard_dims'])}"
        )
    if m.get("serving_config"):
        print(
            f"serve with config {m['serving_config']}: scripts/serve_policy.py policy:checkpoint "
            f"--policy.config={m['serving_config']} --policy.dir={result.output}"
        )
    return 0
