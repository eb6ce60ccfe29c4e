"""What an output may be, checked before any work (and again at the commit, `output`):

1. never the source, a directory around it, or anything inside it;
2. never inside any checkpoint (`checkpoint_dirs`: an openpi step, an Orbax checkpoint, an output of this tool),
   judged on the path as written and as resolved (symlinks followed), except a step's own reserved slot:
   `<step>/merged`, `<step>/merged_pytorch`, `<step>/merged_lerobot`, `<step>/lerobot_peft`, each for its kind of
   output and for the step the command reads (step 1's slot never holds step 2's weights; the Orbax slot never a
   PyTorch export);
3. a path this tool can write: UTF-8, a name short enough for its staging directory, a parent directory;
4. `--overwrite` replaces only an empty directory or what this tool can prove it wrote (`ownership`).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import pathlib
from typing import Literal

from openpi_merge_plugin.checkpoint import checkpoint_dirs
from openpi_merge_plugin.checkpoint import ownership
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.errors import OutputExistsError
from openpi_merge_plugin.errors import OutputRefusedError
from openpi_merge_plugin.options import shown

MANIFEST = checkpoint_dirs.MANIFEST
PLUGIN = checkpoint_dirs.PLUGIN
FAILURE_MARKER = ownership.FAILURE_MARKER
# A step's reserved slots, each for one kind of output: the merge of a LoRA step and its exports (offline or on
# save) in `merged`, `merged_<format>`, the LoRA step's own adapters as a LeRobot PEFT adapter in `lerobot_peft`;
# the export of a step without adapters (a full fine-tune) in `<format>`.
MERGED_NAME = "merged"
PYTORCH_NAME = "merged_pytorch"
LEROBOT_NAME = "merged_lerobot"
PEFT_NAME = "lerobot_peft"
OutputKind = Literal["merged", "pytorch", "lerobot", "lerobot-peft"]
LORA_STEP_SLOTS = (MERGED_NAME, PYTORCH_NAME, LEROBOT_NAME, PEFT_NAME)
SLOT_KIND: dict[str, OutputKind] = {
    MERGED_NAME: "merged",
    PYTORCH_NAME: "pytorch",
    LEROBOT_NAME: "lerobot",
    PEFT_NAME: "lerobot-peft",
    "pytorch": "pytorch",
    "lerobot": "lerobot",
}
STEP_OUTPUT_NAMES = tuple(SLOT_KIND)
KIND_DESCRIPTION: dict[OutputKind, str] = {
    "merged": "merged Orbax checkpoint",
    "pytorch": "PyTorch export",
    "lerobot": "LeRobot export",
    "lerobot-peft": "LeRobot PEFT adapter",
}


def lora_step_slot(kind: OutputKind) -> str:
    """The slot of a LoRA step for this kind of output (`merged_pytorch` for a PyTorch export, ...)."""
    return next((name for name in LORA_STEP_SLOTS if SLOT_KIND[name] == kind), f"{MERGED_NAME}_{kind}")


@dataclasses.dataclass(frozen=True)
class Protected:
    """A directory a command reads and must never modify: the output may not be it, contain it or lie inside it.
    `own_children`: the step's reserved slots the command's output may take (the source step's own), if any."""

    path: pathlib.Path
    what: str  # "the LoRA step", "the merged checkpoint"
    own_children: tuple[str, ...] = ()


def check_output(
    output: pathlib.Path,
    *,
    overwrite: bool,
    protected: Sequence[Protected] = (),
    kind: OutputKind | None = None,
) -> pathlib.Path:
    """Fails early, before any work, if `output` cannot or must not be written; returns it as an absolute path
    (its parent resolved). `kind`: what the command writes, which decides the step slot it may take."""
    check_name(as_written(output), "--output")
    written, out = as_written(output), absolute(output)
    check_utf8(written, "--output")
    slots = own_slots(protected, kind)
    for guarded in protected:
        for path in dict.fromkeys((written, out)):
            _check_apart(path, written, guarded, slots)
    check_not_in_checkpoint(written, out, "--output", kind=kind, own_slots=slots)
    exists = out.is_symlink() or out.exists()
    if not exists and out.name.isdigit() and checkpoint_dirs.steps_in(out.parent):
        raise OutputRefusedError(
            f"--output {shown(written)} would look like step {out.name} of the training run {shown(out.parent)} to "
            "openpi and Orbax; choose a name that is not a step number"
        )
    if exists:
        if not overwrite:
            raise OutputExistsError(f"output {shown(written)} already exists (pass --overwrite to replace it)")
        why_not = not_replaceable(out)
        if why_not is not None:
            raise OutputRefusedError(
                f"--output {shown(written)} {why_not}; --overwrite replaces only an unchanged earlier output of "
                "openpi-merge-lora or an empty directory: choose another --output"
            )
    check_writable(out, written, "--output")
    return out


def as_written(path: pathlib.Path | str) -> pathlib.Path:
    """`path` made absolute as the user wrote it: `~` expanded, `.` and `..` taken by their names (no symlink
    followed)."""
    return pathlib.Path(os.path.abspath(os.path.expanduser(path)))


def absolute(path: pathlib.Path | str) -> pathlib.Path:
    """`path` made absolute with every symlink above its last part resolved; the last part is kept as it is (a
    link there is refused, not followed). `..` and `.` are resolved as the filesystem does."""
    path = pathlib.Path(os.path.expanduser(path))
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def check_utf8(path: pathlib.Path, flag: str) -> None:
    """Paths are written into manifests and opened by TensorStore, which need UTF-8."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputRefusedError(
            f"{flag} {shown(path)} is not a UTF-8 path (TensorStore and the manifest cannot name it): choose a "
            "UTF-8 name"
        ) from None


def check_not_in_checkpoint(
    written: pathlib.Path,
    resolved: pathlib.Path,
    flag: str,
    *,
    kind: OutputKind | None = None,
    own_slots: Sequence[pathlib.Path] = (),
) -> None:
    """Refuses a path inside any checkpoint (as written or as resolved), but for one of `own_slots`: the slots for
    `kind` of the steps the command reads (`<step>/merged` for a merge, ...; `own_slots`)."""
    own = {p.parent.resolve() / p.name for p in own_slots}
    for path in dict.fromkeys((written, resolved)):
        for found in checkpoint_dirs.containing(path):
            in_slot = found.path == path.parent and found.kind == "step"
            if in_slot and found.path.resolve() / path.name in own:
                continue
            resolved_to = f" (resolved: {shown(path)})" if path != written else ""
            if in_slot and path.name in STEP_OUTPUT_NAMES:
                raise OutputRefusedError(_wrong_slot(written, found.path, path.name, kind, own) + resolved_to)
            outside = "any checkpoint step" if found.kind == "step" else "it"
            raise OutputRefusedError(
                f"{flag} {shown(written)}{resolved_to} lies inside {checkpoint_dirs.DESCRIPTION[found.kind]} "
                f"{shown(found.path)}, which is never modified: choose a directory outside {outside}"
                f"{_slot_hint(own)}"
            )


def _wrong_slot(
    written: pathlib.Path, step: pathlib.Path, name: str, kind: OutputKind | None, own: set[pathlib.Path]
) -> str:
    slot_kind = SLOT_KIND[name]
    what = KIND_DESCRIPTION[kind] if kind is not None else "this output"
    mine = [slot for slot in sorted(own) if slot.parent == step.resolve()]
    if kind is not None and slot_kind == kind and mine:
        return (
            f"--output {shown(written)} is the slot of step {shown(step)} for a {what} of "
            f"{'a step without adapters' if name == kind else 'its merge'}, and this command writes the other: "
            f"choose {' or '.join(shown(s) for s in mine)} or a directory outside the step"
        )
    if kind is None or not mine:
        steps = sorted({slot.parent for slot in own})
        whose = (
            f"this command writes the {what} of step {', '.join(shown(s) for s in steps)}"
            if steps
            else f"this command's {what} is not that step's"
        )
        return (
            f"--output {shown(written)} is the slot of step {shown(step)} for its own {KIND_DESCRIPTION[slot_kind]}, "
            f"and {whose}: choose a directory outside any checkpoint step{_slot_hint(own)}"
        )
    return (
        f"--output {shown(written)} is the slot of step {shown(step)} for its {KIND_DESCRIPTION[slot_kind]}, not for "
        f"a {what}: choose {' or '.join(shown(s) for s in mine)} or a directory outside the step"
    )


def _slot_hint(own: set[pathlib.Path]) -> str:
    if not own:
        return ""
    return f" (or {' or '.join(shown(slot) for slot in sorted(own))})"


def own_slots(protected: Sequence[Protected], kind: OutputKind | None) -> list[pathlib.Path]:
    """The step slots the output may take: those for `kind` among the sources' `own_children`."""
    if kind is None:
        return []
    return [
        guarded.path.resolve() / name
        for guarded in protected
        for name in guarded.own_children
        if SLOT_KIND.get(name) == kind
    ]


def check_name(path: pathlib.Path, flag: str) -> None:
    """Every part of `path` fits the filesystem's name limit (checked first: a longer one fails every lookup)."""
    for part in path.parts:
        name_bytes = len(os.fsencode(part))
        if name_bytes > 255:  # NAME_MAX of Linux filesystems; a lookup of a longer name fails on every one
            raise MergeError(
                f"{flag} {shown(path)[:200]}...: the name {shown(part)[:40]}... is {name_bytes} bytes long, and "
                "filesystems allow 255: choose a shorter name"
            )


def check_writable(out: pathlib.Path, written_as: pathlib.Path, flag: str) -> None:
    """The parent exists (as a directory) and may be written, and `out`'s name fits the filesystem's limit."""
    parent = out.parent
    written = f"plot {shown(written_as)}" if flag == "--plot" else shown(written_as)
    if not parent.is_dir():
        existing = next((p for p in parent.parents if p.exists()), None) if not parent.exists() else parent
        if existing is not None and not existing.is_dir():
            raise MergeError(f"cannot write {written}: {shown(existing)} is a file, not a directory")
        raise MergeError(f"cannot write {written}: parent directory {shown(parent)} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write {written}: parent directory {shown(parent)} is not writable")


def _check_apart(path: pathlib.Path, written: pathlib.Path, guarded: Protected, slots: Sequence[pathlib.Path]) -> None:
    """`path` (the output, as written or resolved) is not the protected directory, around it or inside it (but for
    its reserved slots: which one holds what is `check_not_in_checkpoint`'s to say)."""
    src = guarded.path.resolve()
    sources = dict.fromkeys((src, as_written(guarded.path)))
    for source in sources:
        if path == source:
            raise OutputRefusedError(
                f"--output {shown(written)} is {guarded.what} itself; it is never modified: choose another --output"
            )
        if source.is_relative_to(path):
            raise OutputRefusedError(
                f"--output {shown(written)} contains {guarded.what} {shown(src)}, which is never modified: choose "
                "another --output"
            )
        if path.is_relative_to(source) and not (path.parent == source and path.name in guarded.own_children):
            allowed = " or ".join(shown(slot) for slot in slots if slot.parent == src)
            raise OutputRefusedError(
                f"--output {shown(written)} lies inside {guarded.what} {shown(src)}, which is never modified: choose "
                f"a directory outside it{f' (or {allowed})' if allowed else ''}"
            )


def not_replaceable(path: pathlib.Path) -> str | None:
    """Why `--overwrite` must not replace `path`, or None if it may (an unchanged earlier output of this tool, or
    an empty directory): `ownership.why_not_ours`."""
    return ownership.why_not_ours(path)
