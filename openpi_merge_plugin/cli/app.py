"""`openpi-merge-lora`: merge (default), verify and inspect openpi LoRA checkpoints.

openpi-merge-lora [merge] STEP_DIR ...    merge a LoRA step into STEP_DIR/merged
openpi-merge-lora verify MERGED_DIR ...   re-check a merged checkpoint against its manifest
openpi-merge-lora inspect DIR ...         show what a LoRA step or merged checkpoint holds
openpi-merge-lora export SRC ...          openpi's PyTorch checkpoint or LeRobot's policy of any openpi checkpoint
openpi-merge-lora --version               the plugin's version
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import logging
import os
import re
import sys

import tyro

from openpi_merge_plugin import __version__
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
# An error message is one line of at most this many characters (a path or a library's text can be any length).
MAX_MESSAGE_CHARS = 2000


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; `openpi-merge-lora STEP_DIR ...` (no subcommand) means `merge`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(_overview())
        return 0
    if argv and argv[0] in ("-V", "--version"):
        print(f"openpi-merge-lora {__version__}")
        return 0
    try:
        name = _subcommand(argv)
    except UsageError as e:
        _error(str(e))
        return 2
    if argv and argv[0] == name:
        argv.pop(0)
    module = importlib.import_module(SUBCOMMANDS[name][0])
    _quiet_logging()
    try:
        args = _parse(module.Args, argv, prog=f"openpi-merge-lora {name}")
        return module.run(args)
    except UsageError as e:
        _error(str(e))
        return 2
    except OptionError as e:
        _error(e.as_flag())
        return 1
    except MergeError as e:
        _error(str(e))
        return 1
    except OSError as e:  # the filesystem said no (permissions, a vanished file, ...): its own words, one line
        _error(str(e))
        return 1


def _error(message: str) -> None:
    """`error: <message>` on one line, however long or multi-line the message (a library's text, a path)."""
    try:  # a path of another encoding arrives with its bytes as surrogates: shown as \xNN escapes
        message = message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    text = " ".join(message.split())
    if len(text) > MAX_MESSAGE_CHARS:
        head, tail = MAX_MESSAGE_CHARS * 2 // 3, MAX_MESSAGE_CHARS // 4
        text = f"{text[:head]} ... ({len(text) - head - tail} characters left out) ... {text[-tail:]}"
    print(f"error: {text}", file=sys.stderr)


def _subcommand(argv: list[str]) -> str:
    """The subcommand `argv` names (its first word), else merge; a first word that is neither a subcommand nor an
    existing path but reads like a misspelt subcommand is a usage error."""
    if not argv or argv[0] in SUBCOMMANDS:
        return argv[0] if argv else DEFAULT_SUBCOMMAND
    word = argv[0]
    if word.startswith("-") or os.path.lexists(word):
        return DEFAULT_SUBCOMMAND
    close = difflib.get_close_matches(word, SUBCOMMANDS, n=1, cutoff=0.6)
    names = ", ".join(SUBCOMMANDS)
    if close:
        raise UsageError(
            f"unknown subcommand {word!r} (and no such path): did you mean {close[0]!r}? Subcommands: {names}; "
            f"without one, the first argument is the step to merge"
        )
    if len(argv) > 1 and not argv[1].startswith("-"):
        raise UsageError(
            f"unknown subcommand {word!r} (and no such path): subcommands are {names}; without one, the first "
            "argument is the step to merge"
        )
    return DEFAULT_SUBCOMMAND


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
    lines += ["", "`openpi-merge-lora SUBCOMMAND --help` shows the options of each; --version the plugin's version."]
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
