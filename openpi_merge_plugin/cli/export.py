"""`openpi-merge-lora export SRC --format pytorch|lerobot`: openpi's PyTorch checkpoint, or LeRobot 0.6.1's policy
directory, of a merged checkpoint or LoRA step."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import tyro

from openpi_merge_plugin import options
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import lerobot as lerobot_export
from openpi_merge_plugin.formats import lerobot_files
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export as pytorch_export


@dataclasses.dataclass
class Args:
    """Write a serving directory: openpi's PyTorch checkpoint (`model.safetensors`, `config.json`, `assets/`), or
    LeRobot's (`model.safetensors`, `config.json`, pre/post-processors), with `manifest.json`."""

    # A merged checkpoint (<step>/merged) or a LoRA step directory (merged on the way, streamed, verified).
    src: tyro.conf.Positional[pathlib.Path]
    # Output format. pytorch: openpi's PI0Pytorch state dict (pi0 and pi0.5; pi0-FAST has no PyTorch model).
    # lerobot: LeRobot 0.6.1's PI0Policy / PI05Policy directory (weights, config, processors); pi0-FAST is refused
    # (LeRobot's PI0FastPolicy decodes after an extra BOS token: docs/lerobot.md).
    format: Literal["pytorch", "lerobot"] = "pytorch"
    # Tensor dtype. pytorch, as upstream's converter: bfloat16 rounds every tensor; float32 keeps exact values for
    # the parameters PI0Pytorch holds in float32 (all of them when the config's model dtype is float32). lerobot:
    # also the policy's config dtype; bfloat16 keeps the vision tower, projector, norms and the action/state/time
    # projections float32, as LeRobot does.
    precision: pytorch_export.Precision = "float32"
    # Output directory (default: <step>/merged_<format> for a LoRA step, <merged>_<format> beside a merged directory).
    output: pathlib.Path | None = None
    # Registered openpi TrainConfig: the model config, and for a LoRA step its LoRA config (needs openpi); default:
    # the openpi config the merge records. For a LoRA step without openpi: --lora-config or --alpha [--rslora].
    lora_source: tyro.conf.OmitArgPrefixes[checkpoint_merge.LoRASource] = dataclasses.field(
        default_factory=checkpoint_merge.LoRASource
    )
    # Without openpi: the model's action horizon (config.json). pytorch: the variants are those the merge records;
    # lerobot: they are found by the params' dims.
    action_horizon: int | None = None
    # pytorch, without openpi: Pi0Config.dtype, which decides which params PI0Pytorch rounds to bfloat16.
    model_dtype: pytorch_export.Precision = "bfloat16"
    # lerobot: name cameras as your LeRobot dataset does, one or more OPENPI_NAME=FEATURE, e.g.
    # --camera base_0_rgb=observation.images.top left_wrist_0_rgb=observation.images.wrist; openpi's cameras are
    # base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb, in model order, and default to observation.images.<name>.
    camera: tuple[str, ...] = ()
    # lerobot: the norm stats' asset_id (assets/<asset_id>/norm_stats.json); default: the openpi config's, else the
    # only norm stats in the checkpoint's assets/.
    asset_id: str | None = None
    # lerobot: an openpi norm_stats.json to take instead of the checkpoint's assets/<asset_id>/norm_stats.json.
    norm_stats: pathlib.Path | None = None
    # lerobot: actions executed per predicted chunk (LeRobot's n_action_steps); default: the whole chunk.
    n_action_steps: int | None = None
    # lerobot, without openpi: the prompt's token length (openpi's max_token_len; default: openpi's default for the
    # model, 48 pi0, 200 pi0.5, 250 pi0-FAST).
    max_token_len: int | None = None
    # lerobot: the device in config.json and the processors. LeRobot's entry points replace it with the policy's
    # device, and the policy falls back to an available one; a direct make_pre_post_processors needs it present.
    device: str = "cuda"
    # Replace an earlier export (an empty directory, or an output of this tool; nothing else).
    overwrite: bool = False
    # Write a model whose dimensions differ from those the runtime hard-codes (PI0Pytorch: SigLIP, vocabulary,
    # projector; LeRobot also the gemma_2b / gemma_300m experts); it then loads only into a model built with them,
    # and the manifest lists them.
    allow_nonstandard_dims: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                **options.SUBCOMMAND_CHECKS,
                "src": options.ANY,
                "format": options.one_of(("pytorch", "lerobot")),
                "precision": options.one_of(pytorch_export.Precision),
                "output": options.ANY,
                "action_horizon": options.optional(options.positive_int),
                "model_dtype": options.one_of(pytorch_export.Precision),
                "camera": options.ANY,  # checked below: NAME=FEATURE, openpi's names
                "asset_id": options.optional(options.text),
                "norm_stats": options.optional(options.existing_file),
                "n_action_steps": options.optional(options.positive_int),
                "max_token_len": options.optional(options.positive_int),
                "device": options.text,
                "allow_nonstandard_dims": options.ANY,
            },
        )
        if self.lora_source.config and self.action_horizon is not None:
            raise ConfigError("--config and --action-horizon are alternatives: give one")
        lerobot_only = ("camera", "asset_id", "norm_stats", "n_action_steps", "max_token_len")
        if self.format != "lerobot" and any(getattr(self, f) not in ((), None) for f in lerobot_only):
            raise ConfigError(f"--{'/--'.join(f.replace('_', '-') for f in lerobot_only)} are for --format lerobot")
        self.cameras()  # each NAME=FEATURE well formed, with openpi's names

    def cameras(self) -> dict[str, str]:
        """--camera NAME=FEATURE pairs as a dict."""
        pairs = {}
        for item in self.camera:
            name, sep, feature = item.partition("=")
            if not sep or not name or not feature or name in pairs:
                raise ConfigError(f"--camera {item!r}: give each camera once, as OPENPI_NAME=FEATURE")
            pairs[name] = feature
        try:
            lerobot_files.camera_names(pairs)
        except lerobot_files.LeRobotFilesError as e:
            raise ConfigError(f"--camera: {e}") from None
        return pairs


def run(args: Args) -> int:
    """Exports; prints where, and the manifest's verification line."""
    bar = None

    def progress(stage: str, n: int, total: int) -> None:
        nonlocal bar
        if not args.progress:
            return
        import tqdm

        if bar is None:
            bar = tqdm.tqdm(total=total, unit="tensor", desc="export", file=sys.stderr)
        bar.update(n - bar.n)

    if args.format == "lerobot":
        try:
            return _run_lerobot(args, progress)
        finally:
            if bar is not None:
                bar.close()
    config = args.lora_source.config
    model = pytorch_export.model_info_from_openpi(config) if config else None
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


def _run_lerobot(args: Args, progress) -> int:
    config = args.lora_source.config
    if config:
        model = lerobot_export.model_from_openpi(config)
        model = dataclasses.replace(model, asset_id=args.asset_id or model.asset_id)
    elif args.action_horizon is not None:
        model = lerobot_export.LeRobotModel(args.action_horizon, args.max_token_len, asset_id=args.asset_id)
    else:
        model = None  # the openpi config the merge records
    result = lerobot_export.export_lerobot(
        args.src,
        output=args.output,
        precision=args.precision,
        model=model,
        naming=lerobot_export.Naming(args.cameras(), args.n_action_steps, args.device, args.norm_stats),
        lora=args.lora_source if args.lora_source.given else None,
        overwrite=args.overwrite,
        allow_nonstandard_dims=args.allow_nonstandard_dims,
        progress=progress,
    )
    m = result.manifest
    file_check = m["verification"]["file"]
    print(f"exported {m['tensors']} tensors ({m['precision']}) for LeRobot {m['policy']['type']} to {result.output}")
    print(f"read back with {file_check['reader']}: {file_check['tensors_checked']} tensors bitwise as laid out")
    if m["nonstandard_dims"]:
        print(f"dimensions LeRobot does not build (--allow-nonstandard-dims): {', '.join(m['nonstandard_dims'])}")
    print(f"load with LeRobot: --policy.path={result.output}")
    return 0
