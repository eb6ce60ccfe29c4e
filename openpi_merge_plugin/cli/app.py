"""`openpi-merge-lora`: merge (default), verify and inspect openpi LoRA checkpoints.

openpi-merge-lora [merge] STEP_DIR ...    merge a LoRA step into STEP_DIR/merged
openpi-merge-lora verify MERGED_DIR ...   re-check a merged checkpoint against its manifest
openpi-merge-lora inspect DIR ...         show what a LoRA step or merged checkpoint holds
openpi-merge-lora export SRC ...          openpi's PyTorch checkpoint of a merged checkpoint or LoRA step
"""

from __future__ import annotations

import importlib
import logging
import sys

import tyro

from openpi_merge_plugin.errors import MergeError

# name -> (module, one-line help); the module defines `Args` and `run(args) -> int`.
SUBCOMMANDS = {
    "merge": ("openpi_merge_plugin.cli.merge", "merge the LoRA adapters of a step into a serving checkpoint"),
    "verify": ("openpi_merge_plugin.cli.verify", "re-check a merged checkpoint: files, params, layer outputs"),
    "inspect": (
        "openpi_merge_plugin.cli.inspect",
        "show a LoRA step's or merged checkpoint's adapters and updates",
    ),
    "export": ("openpi_merge_plugin.cli.export", "write openpi's PyTorch checkpoint (model.safetensors) of a merge"),
}
DEFAULT_SUBCOMMAND = "merge"


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; `openpi-merge-lora STEP_DIR ...` (no subcommand) means `merge`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    name = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else DEFAULT_SUBCOMMAND
    module = importlib.import_module(SUBCOMMANDS[name][0])
    _quiet_logging()
    args = tyro.cli(module.Args, args=argv, prog=f"openpi-merge-lora {name}")
    try:
        return module.run(args)
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _overview() -> str:
    lines = ["usage: openpi-merge-lora [SUBCOMMAND] ARGS ...  (default subcommand: merge)", "", "subcommands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "`openpi-merge-lora SUBCOMMAND --help` shows the options of each."]
    return "\n".join(lines)


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    # orbax logs every restore at INFO and warns about the partial-restore API we read single weights with.
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("root").setLevel(logging.WARNING)


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
