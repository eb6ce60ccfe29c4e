"""`openpi-merge-lora export SRC --format pytorch|lerobot|lerobot-peft`: openpi's PyTorch checkpoint, or LeRobot
0.6.1's policy directory, of any openpi checkpoint: a LoRA step (merged on the way), a merged checkpoint, a non-LoRA
train step or a released checkpoint (or its params/); or a LoRA step's adapters as a LeRobot PEFT adapter."""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Literal

import tyro

from openpi_merge_plugin import formats
from openpi_merge_plugin import options
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import lerobot_files
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.lora.configs import LoRASource
from openpi_merge_plugin.pipeline import export

FormatName = Literal[tuple(formats.FORMATS)]  # type: ignore[valid-type]


@dataclasses.dataclass
class Args:
    """Write a serving directory of an openpi checkpoint: openpi's PyTorch checkpoint (`model.safetensors`,
    `config.json`, `assets/`), or LeRobot's (`model.safetensors`, `config.json`, pre/post-processors), with
    `manifest.json`. The model (pi0, pi0.5, pi0-FAST) and its dims are read off the params."""

    # A LoRA step (merged on the way, streamed, verified), a merged checkpoint (<step>/merged), a non-LoRA train step
    # (full fine-tune, EMA or not), a released checkpoint as openpi downloads it (<name>/params + <name>/assets), or
    # the params/ directory of one of them.
    src: tyro.conf.Positional[pathlib.Path]
    # Output format. pytorch: openpi's PI0Pytorch state dict (pi0 and pi0.5; pi0-FAST has no PyTorch model).
    # lerobot: LeRobot 0.6.1's PI0Policy / PI05Policy directory (weights, config, processors); pi0-FAST is refused
    # (LeRobot's PI0FastPolicy decodes after an extra BOS token: docs/lerobot.md). lerobot-peft: a LoRA step's
    # adapters as a PEFT adapter LeRobot loads on --base (pi0, pi0.5; docs/lerobot-peft.md).
    format: FormatName = "pytorch"
    # Output directory (default: <step>/merged_<format> for a LoRA step, <step>/lerobot_peft for its adapter,
    # <merged>_<format> beside a merged checkpoint, <checkpoint>/<format> inside any other).
    output: pathlib.Path | None = None
    # --config: a registered openpi TrainConfig (needs openpi): what the params cannot tell (action horizon, token
    # length, dtype, asset_id; read, never built), and for a LoRA step its LoRA config. Default: the openpi config a
    # merge records, else the options below and openpi's defaults. For a LoRA step without openpi: --lora-config or
    # --alpha [--rslora] (default: openpi's shipped variants, when the shapes match them).
    lora_source: tyro.conf.OmitArgPrefixes[LoRASource] = dataclasses.field(default_factory=LoRASource)
    # How to export, and what the params cannot tell.
    export: tyro.conf.OmitArgPrefixes[ExportOptions] = dataclasses.field(default_factory=ExportOptions)
    # Replace an earlier export (an empty directory, or an output of this tool; nothing else).
    overwrite: bool = False
    # Show a progress bar.
    progress: bool = True

    def __post_init__(self) -> None:
        options.validate(
            self,
            {
                **options.SUBCOMMAND_CHECKS,
                "src": options.ANY,
                "format": options.one_of(tuple(formats.FORMATS)),
                "output": options.ANY,
                "export": options.ANY,  # checks itself
            },
        )
        if self.lora_source.config and self.export.model_options:
            given = "/--".join(f.replace("_", "-") for f in self.export.model_options)
            raise ConfigError(f"--config and --{given} are alternatives: give one")
        try:  # the names, before any work (the format checks them again, for the API)
            lerobot_files.camera_names(self.export.cameras())
        except lerobot_files.LeRobotFilesError as e:
            raise ConfigError(f"--camera: {e}") from None
        chosen = formats.FORMATS[self.format]
        others: dict[str, list[str]] = {}
        for f in formats.FORMATS.values():
            for o in sorted(f.options - chosen.options):
                others.setdefault(o, []).append(f.name)
        defaults = ExportOptions()
        wrong = sorted(o for o in others if getattr(self.export, o) != getattr(defaults, o))
        if wrong:
            flags = "/".join(f"--{o.replace('_', '-')}" for o in wrong)
            which = " or ".join(others[wrong[0]])
            raise ConfigError(f"{flags} {'is' if len(wrong) == 1 else 'are'} for --format {which}")


def run(args: Args) -> int:
    """Exports; prints where, what was read and how, and how to load it."""
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
        result = export.export(
            args.src,
            args.format,
            options=args.export,
            config=args.lora_source.config,
            lora=args.lora_source if args.lora_source.given else None,
            output=args.output,
            overwrite=args.overwrite,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    m = result.manifest
    file_check, merge = m["verification"]["file"], m["verification"]["merge"]
    kind = f" {m['policy']['type']}" if "policy" in m else ""
    print(f"exported {m['tensors']} tensors ({m['precision']}) as {m['format']}{kind} to {result.output}")
    if merge.get("merged") is False:
        print(f"nothing merged: {merge['identity']}")
    defaults = {k: v for k, v in m["model_facts"].items() if v.startswith("openpi's default")}
    if defaults:
        values = ", ".join(f"{k} {v.rsplit(': ', 1)[-1]}" for k, v in defaults.items())
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in defaults)
        what = next(iter(defaults.values())).rsplit(":", 1)[0]
        print(f"no openpi config: {values} ({what}; pass --config NAME, or {flags}, to change)")
    print(f"read back with {file_check['reader']}: {file_check['tensors_checked']} tensors bitwise as laid out")
    for line in formats.FORMATS[m["format"]].describe(m):
        print(line)
    return 0
