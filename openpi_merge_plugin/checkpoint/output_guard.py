"""What an output may be: never the source, around it or inside it, and `--overwrite` replaces only what this tool
wrote (or an empty directory). Checked before any work, and again at the commit (`output`)."""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import pathlib

from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.errors import OutputExistsError
from openpi_merge_plugin.errors import OutputRefusedError

MANIFEST = "manifest.json"
# What the tool writes into a LoRA step: the merged checkpoint, its PyTorch and LeRobot exports (offline or on save).
MERGED_NAME = "merged"
PYTORCH_NAME = "merged_pytorch"
LEROBOT_NAME = "merged_lerobot"
STEP_OUTPUT_NAMES = (MERGED_NAME, PYTORCH_NAME, LEROBOT_NAME)
PLUGIN = "openpi-merge-plugin"  # the manifest's "plugin" field, which marks an output of this tool
# Written instead of a checkpoint when a merge on save fails (training goes on).
FAILURE_MARKER = "MERGE_FAILED.json"


@dataclasses.dataclass(frozen=True)
class Protected:
    """A directory a command reads and must never modify: the output may not be it, contain it or lie inside it,
    except as one of `own_children` (new direct children the tool itself writes there, such as `<step>/merged`)."""

    path: pathlib.Path
    what: str  # "the LoRA step", "the merged checkpoint"
    own_children: tuple[str, ...] = ()


def check_output(output: pathlib.Path, *, overwrite: bool, protected: Sequence[Protected] = ()) -> pathlib.Path:
    """Fails early, before any work, if `output` cannot or must not be written; returns it as an absolute path.

    `--overwrite` replaces only an empty directory or an earlier output of this tool (recognised by its manifest, or
    by the failure marker of a merge on save) holding nothing its manifest does not list.
    """
    out = absolute(output)
    for guarded in protected:
        _check_apart(out, guarded)
    exists = out.is_symlink() or out.exists()
    if not exists and out.name.isdigit() and any(_is_step(p) for p in out.parent.glob("[0-9]*")):
        raise OutputRefusedError(
            f"--output {out} would look like step {out.name} of the training run {out.parent} to openpi and Orbax; "
            "choose a name that is not a step number"
        )
    if exists:
        if not overwrite:
            raise OutputExistsError(f"output {out} already exists (pass --overwrite to replace it)")
        why_not = not_replaceable(out)
        if why_not is not None:
            raise OutputRefusedError(
                f"--output {out} {why_not}; --overwrite replaces only an earlier output of openpi-merge-lora or an "
                "empty directory: choose another --output"
            )
    parent = out.parent
    if not parent.is_dir():
        raise MergeError(f"cannot write {out}: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MergeError(f"cannot write {out}: parent directory {parent} is not writable")
    return out


def absolute(path: pathlib.Path | str) -> pathlib.Path:
    """`path` made absolute with every symlink above its last part resolved; the last part is kept as it is (a
    link there is refused, not followed). `..` and `.` are resolved as the filesystem does."""
    path = pathlib.Path(os.path.expanduser(path))
    if path.name in ("", ".", ".."):
        return path.resolve()
    return path.parent.resolve() / path.name


def _check_apart(out: pathlib.Path, guarded: Protected) -> None:
    src = guarded.path.resolve()
    if out == src:
        raise OutputRefusedError(
            f"--output {out} is {guarded.what} itself; it is never modified: choose another --output"
        )
    if src.is_relative_to(out):
        raise OutputRefusedError(
            f"--output {out} contains {guarded.what} {src}, which is never modified: choose another --output"
        )
    if out.is_relative_to(src) and not (out.parent == src and out.name in guarded.own_children):
        allowed = " or ".join(str(src / n) for n in guarded.own_children)
        raise OutputRefusedError(
            f"--output {out} lies inside {guarded.what} {src}, which is never modified: choose a directory outside "
            f"it{f' (or {allowed})' if allowed else ''}"
        )


def not_replaceable(path: pathlib.Path) -> str | None:
    """Why `--overwrite` must not replace `path`, or None if it may (an earlier output of this tool, or empty)."""
    if path.is_symlink():
        return "is a symbolic link (replacing it would replace the link, not what it points to)"
    if not path.is_dir():
        return "is a file, not a directory"
    if os.path.ismount(path):
        return "is a mount point, which cannot be replaced by a rename"
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())
    if not names:
        return None  # empty (or empty directories only): nothing to lose
    listed = _own_files(path)
    if listed is None:
        if _is_step(path):
            return "is an openpi checkpoint step (it has params/ and no manifest of openpi-merge-lora)"
        steps = sorted(p.name for p in path.glob("[0-9]*") if _is_step(p))
        if steps:
            return f"is a training run's checkpoint directory (steps {', '.join(steps)})"
        return f"holds {_count(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) and no manifest of openpi-merge-lora"
    unknown = [n for n in names if n not in listed]
    if unknown:
        return (
            f"is an output of openpi-merge-lora but also holds files its manifest does not list "
            f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''})"
        )
    return None


def _own_files(path: pathlib.Path) -> set[str] | None:
    """The files an output of this tool at `path` consists of, by its manifest (or failure marker); None if none."""
    marker = path / FAILURE_MARKER
    if marker.is_file() and [p.name for p in path.iterdir()] == [FAILURE_MARKER]:
        return {FAILURE_MARKER}
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("plugin") != PLUGIN
        or not isinstance(manifest.get("files"), dict)
    ):
        return None
    return {MANIFEST, *manifest["files"]}


def _is_step(path: pathlib.Path) -> bool:
    return path.is_dir() and (path / "params").is_dir() and not (path / MANIFEST).is_file()


def _count(names: list[str]) -> str:
    return f"{len(names)} file{'s' if len(names) != 1 else ''}"
