"""`openpi-merge-lora export SRC --format pytorch`: openpi's PyTorch checkpoint of a merged checkpoint or LoRA step."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import tyro

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.pipeline import checkpoint_merge as api
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
    precision: Literal["float32", "bfloat16"] = "float32"
    # Output directory (default: <step>/merged_pytorch).
    output: pathlib.Path | None = None
    # Registered openpi TrainConfig for the model config (needs openpi); default: the one the manifest names.
    config: str | None = None
    # Without openpi: the model's action horizon (config.json); variants are the manifest's.
    action_horizon: int | None = None
    # Without openpi: Pi0Config.dtype, which decides which params PI0Pytorch rounds to bfloat16.
    model_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    # For a LoRA step SRC: a JSON file with the LoRA config of each expert (default: --config / the tiny-file rules).
    lora_config: pathlib.Path | None = None
    # Replace an existing output directory.
    overwrite: bool = False
    # Write a paligemma width other than 2048 although upstream's PI0Pytorch hard-codes its projector to 2048.
    allow_projector_patch: bool = False
    # Show a progress bar.
    progress: bool = True


def run(args: Args) -> int:
    """Exports; prints where, and the manifest's verification line."""
    if args.config and args.action_horizon is not None:
        raise ConfigError("--config and --action-horizon are alternatives: give one")
    model = None
    if args.config:
        model = pytorch_export.model_info_from_openpi(args.config)
    elif args.action_horizon is not None:
        merged = args.src if (args.src / "manifest.json").is_file() else None
        if merged is None:
            raise ConfigError("--action-horizon needs SRC to be a merged checkpoint (its manifest names the variants)")
        model = pytorch_export.model_info_from_manifest_variants(
            merged, action_horizon=args.action_horizon, model_dtype=args.model_dtype
        )
    lora = api.LoRASource(config=args.config, lora_config=args.lora_config) if args.lora_config or args.config else None
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
            lora=lora,
            overwrite=args.overwrite,
            allow_projector_patch=args.allow_projector_patch,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    m = result.manifest
    file_check = m["verification"]["file"]
    print(f"exported {m['tensors']} tensors ({m['precision']}) to {result.output}")
    print(f"read back with {file_check['reader']}: {file_check['tensors_checked']} tensors bitwise as laid out")
    if m.get("serving_config"):
        print(
            f"serve with config {m['serving_config']}: scripts/serve_policy.py policy:checkpoint "
            f"--policy.config={m['serving_config']} --policy.dir={result.output}"
        )
    return 0
