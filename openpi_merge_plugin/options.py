"""How to merge (`MergeOptions`), and the checks every option of the package passes before any work starts.

Imports nothing heavy: openpi's config module imports the merge-on-save options (which use these checks) while it
is being built. An option with a bad value fails where it is made, with an `OptionError` naming it; the command
line spells that name as its flag (`--strength`), merge on save as `--merge-lora.strength`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import math
import os
import pathlib
import typing
from typing import Any, Literal

from openpi_merge_plugin.errors import ConfigError

OutputDtype = Literal["float32", "bfloat16", "preserve"]
Check = Callable[[Any], str | None]  # the problem with a value ("must be > 0, got -1"), or None if it is fine


class OptionError(ConfigError):
    """One option with a bad value; `option` is its field name, `problem` what is wrong with the value."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option = option
        self.problem = problem

    def as_flag(self, prefix: str = "--") -> str:
        """The message with the option spelled as a command-line flag."""
        return f"{prefix}{self.option.replace('_', '-')} {self.problem}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    return None


def positive(value: Any) -> str | None:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        return f"must be a finite number > 0, got {value!r}"
    return None


def positive_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return f"must be a positive integer, got {value!r}"
    return None


def non_negative_int(value: Any) -> str | None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        return f"must be an integer >= 0, got {value!r}"
    return None


def int_in(low: int, high: int, why: str = "") -> Check:
    """An integer in low..high (`why`: what the bounds are)."""

    def check(value: Any) -> str | None:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return None
        return f"must be an integer in {low}..{high}{f' ({why})' if why else ''}, got {value!r}"

    return check


# A seed of JAX's PRNG (a signed 64-bit integer) and of numpy's (not negative), which draw the verification probes.
seed = int_in(0, 2**63 - 1, "a seed of JAX's and numpy's random generators")
# Token and action counts of a model: at most Gemma's context (8192 positions), which no openpi model exceeds.
MAX_POSITIONS = 8192
sequence_length = int_in(1, MAX_POSITIONS, "Gemma's context length")
# torch's device types, as LeRobot's config and processors name a device ("cuda", "cuda:1", "cpu", "mps", ...).
TORCH_DEVICE_TYPES = (
    "cpu", "cuda", "mps", "xpu", "xla", "meta", "hpu", "mtia", "npu", "ipu", "hip", "ve", "fpga", "maia", "lazy",
    "vulkan", "ideep", "mkldnn", "opengl", "opencl", "privateuseone",
)  # fmt: skip


def torch_device(value: Any) -> str | None:
    kind, sep, index = value.partition(":") if isinstance(value, str) else ("", "", "")
    if kind in TORCH_DEVICE_TYPES and (not sep or index.isdigit()):
        return None
    return f"must be a torch device such as cuda, cuda:0, cpu or mps, got {value!r}"


def flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def existing_file(value: Any) -> str | None:
    path = pathlib.Path(value)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_file():
        return f"{path} is not a file"
    return None


def shown(path: Any) -> str:
    """A path as a message shows it: bytes that are not UTF-8 (a name from another encoding) as \\xNN escapes."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"must be a non-empty string, got {value!r}"


def one_of(allowed: Any) -> Check:
    """One of the values of a Literal type (or of a tuple)."""
    allowed = typing.get_args(allowed) or tuple(allowed)

    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"

    return check


def choice(owner: type, field: str) -> Check:
    """The values of the field's Literal type."""
    return one_of(typing.get_type_hints(owner)[field])


def validate(options: Any, checks: Mapping[str, Check]) -> None:
    """Checks every field of the dataclass `options`; a field without a check is a bug of this package."""
    for field in dataclasses.fields(options):
        if field.name not in checks:
            raise TypeError(f"{type(options).__name__}.{field.name} has no check")
        problem = checks[field.name](getattr(options, field.name))
        if problem is not None:
            raise OptionError(field.name, problem)


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """How to merge. The defaults are what a serving checkpoint should get."""

    # dtype of merged weights: float32 keeps the whole adapter contribution; "preserve" keeps the base dtype.
    output_dtype: OutputDtype = "float32"
    # Multiplier on the LoRA term (1.0 reproduces training exactly).
    strength: float = 1.0
    # Check every merged layer against openpi's LoRA forward on random probes.
    verify: bool = True
    # Largest allowed max|merged - lora| / max|lora| of any probe output (float32 merged weights).
    tolerance: float = 1e-4
    # Merge even if adapters or results hold NaN/Inf (they are reported either way).
    allow_nonfinite: bool = False
    # Seed of the verification probes.
    seed: int = 0

    def __post_init__(self) -> None:
        validate(self, MERGE_OPTION_CHECKS)

    def dtype_for(self, base_dtype: str) -> str:
        return base_dtype if self.output_dtype == "preserve" else self.output_dtype


# Also the checks of the same options wherever they appear (command line, merge on save).
MERGE_OPTION_CHECKS: dict[str, Check] = {
    "output_dtype": choice(MergeOptions, "output_dtype"),
    "strength": finite,
    "verify": flag,
    "tolerance": positive,
    "allow_nonfinite": flag,
    "seed": seed,
}
# The checks of the LoRA-source options (`LoRASource`), wherever they appear.
LORA_SOURCE_CHECKS: dict[str, Check] = {
    "config": optional(text),
    "lora_config": optional(existing_file),
    "alpha": optional(positive),
    "rslora": flag,
}
# Options whose every value is valid: switches, nested options that check themselves, and paths the command checks
# when it opens them (a step, an output, a merged directory), before any work starts.
ANY: Check = lambda value: None  # noqa: E731
# Options several subcommands share: the nested LoRA source and merge options (which check themselves), switches.
SUBCOMMAND_CHECKS: dict[str, Check] = {
    "lora_source": ANY,
    "merge": ANY,
    "overwrite": ANY,
    "json": ANY,
    "progress": ANY,
}
