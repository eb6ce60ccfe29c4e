"""`openpi-merge-lora`: merge (default), verify and inspect openpi LoRA checkpoints.

openpi-merge-lora [merge] STEP_DIR ...    merge a LoRA step into STEP_DIR/merged
openpi-merge-lora verify MERGED_DIR ...   re-check a merged checkpoint against its manifest
openpi-merge-lora inspect DIR ...         show what a LoRA step or merged checkpoint holds
openpi-merge-lora export SRC ...          openpi's PyTorch checkpoint or LeRobot's policy of any openpi checkpoint
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import re
import sys

import tyro

from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.options import OptionError

# name -> (module, one-line help); the module defines `Args` and `run(args) -> int`.
SUBCOMMANDS = {
    "merge": ("openpi_merge_plugin.cli.merge", "merge the LoRA adapters of a step into a serving checkpoint"),
    "verify": ("openpi_merge_plugin.cli.verify", "re-check a merged checkpoint: files, params, layer outputs"),
    "inspect": (
        "openpi_merge_plugin.cli.inspect",
        "show a LoRA step's or merged checkpoint's adapters and updates",
    ),
    "export": ("openpi_merge_plugin.cli.export", "write any openpi checkpoint for openpi's PyTorch runtime or LeRobot"),
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
    try:
        args = _parse(module.Args, argv, prog=f"openpi-merge-lora {name}")
        return module.run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OptionError as e:
        print(f"error: {e.as_flag()}", file=sys.stderr)
        return 1
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the filesystem said no (permissions, a vanished file, ...): its own words, one line
        print(f"error: {e}", file=sys.stderr)
        return 1


class UsageError(Exception):
    """The command line does not parse (tyro's message, in one line)."""


def _parse(args_type: type, argv: list[str], prog: str) -> object:
    """tyro's parse; its boxed error message comes back as one line (help still goes to stdout)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.cli(args_type, args=argv, prog=prog)
    except SystemExit as e:
        if not e.code:
            raise
        lines = [line for line in captured.getvalue().splitlines() if "\u256d" not in line]  # less the box's title
        text = re.sub(r"[\u2500-\u257f]+", " ", "\n".join(lines))  # and its borders
        raise UsageError(" ".join(text.split()) or f"bad arguments (see {prog} --help)") from None


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
