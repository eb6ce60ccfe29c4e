"""Whether `--overwrite` may replace a directory: only what this tool can prove it wrote, or an empty directory.

The proof is the output's manifest.json (written last), which lists every file of the output with its size and
sha256: the directory must hold those files, each with that size and sha256 still, and nothing else (a symlink,
a user's file, an edit: it is the user's now). A merge on save that failed leaves only `MERGE_FAILED.json`, with
exactly the fields it writes. An openpi checkpoint step, a training run's directory, an Orbax checkpoint is never
replaced, whatever manifest it carries.

Hashing a full-size output takes a while; a directory proven once in this process is proven again without
re-hashing if no file changed since (same inode, size, mtime and ctime: any write changes the ctime).
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import json
import logging
import os
import pathlib
import stat

from openpi_merge_plugin.checkpoint import checkpoint_dirs

logger = logging.getLogger("openpi_merge_plugin")

FAILURE_MARKER = "MERGE_FAILED.json"  # written instead of a checkpoint when a merge on save fails
_FAILURE_FIELDS = ({"step", "error", "traceback"}, {"step", "error", "traceback", "created_utc"})
_SHOWN = 3  # file names a refusal lists
_COUNTED = 1000  # files a refusal counts before it says "more than"

# path -> the fingerprint of every file when it was last proven ours (see `_fingerprint`).
_proven: dict[str, tuple] = {}


def why_not_ours(path: pathlib.Path) -> str | None:
    """Why `--overwrite` must not replace `path` (a phrase: "is a file, not a directory"), or None if it may."""
    if path.is_symlink():
        return "is a symbolic link (replacing it would replace the link, not what it points to)"
    if not path.is_dir():
        return "is a file, not a directory" if path.is_file() else "is not a directory"
    if os.path.ismount(path):
        return "is a mount point, which cannot be replaced by a rename"
    kind = checkpoint_dirs.kind_of(path)
    if kind == "orbax":
        return "is an Orbax checkpoint (it has _METADATA / manifest.ocdbt), never an output of openpi-merge-lora"
    if kind == "step":
        if checkpoint_dirs.has_step_markers(path):
            markers = [n for n in (checkpoint_dirs.STEP_METADATA, "train_state") if (path / n).exists()]
            forged = " and a manifest.json" if (path / checkpoint_dirs.MANIFEST).exists() else ""
            return (
                f"is an openpi checkpoint step (it has {' and '.join(markers)}{forged}), never an output of "
                "openpi-merge-lora"
            )
        return "is an openpi checkpoint step (it has params/ and no manifest of openpi-merge-lora)"
    if steps := checkpoint_dirs.steps_in(path):
        return f"is a training run's checkpoint directory (steps {', '.join(steps)})"
    files, more = _files(path, _COUNTED)
    if not files:
        return None  # empty (or empty directories only): nothing to lose
    if files == [FAILURE_MARKER]:
        if _is_failure_record(path / FAILURE_MARKER):
            return None
        return f"holds a {FAILURE_MARKER} that is not the record of a failed merge on save (its fields differ)"
    manifest = checkpoint_dirs.read_our_manifest(path)
    if manifest is None:
        return f"holds {_count(files, more=more)} ({_names(files)}) and no manifest of openpi-merge-lora"
    if _holds_lora_params(path):
        return "holds a LoRA checkpoint's params (lora_a/lora_b leaves), never an output of openpi-merge-lora"
    return _why_not_as_listed(path, manifest)


def _why_not_as_listed(path: pathlib.Path, manifest: dict) -> str | None:
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not all(_entry_ok(v) for v in listed.values()):
        return "has a manifest.json of openpi-merge-lora without a valid list of its files (size and sha256 each)"
    unknown, links, fingerprint = [], [], []
    for rel, entry in _walk(path):
        if rel == checkpoint_dirs.MANIFEST:
            fingerprint.append((rel, *_stat_key(entry)))
            continue
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            links.append(rel)
        elif rel not in listed:
            unknown.append(rel)
        else:
            fingerprint.append((rel, *_stat_key(entry)))
        if len(unknown) + len(links) > _SHOWN:
            break
    if links:
        return f"is an output of openpi-merge-lora but also holds links or special files ({_names(links)})"
    if unknown:
        return f"is an output of openpi-merge-lora but also holds files its manifest does not list ({_names(unknown)})"
    key = tuple(sorted(fingerprint))
    if _proven.get(str(path)) == key:
        return None
    for rel, _, size, *_ in key:
        if rel != checkpoint_dirs.MANIFEST and size != listed[rel]["bytes"]:
            return (
                f"is an output of openpi-merge-lora whose file {rel} was changed since it was written ({size:,} "
                f"bytes, its manifest says {listed[rel]['bytes']:,})"
            )
    total = sum(size for rel, _, size, *_ in key if rel != checkpoint_dirs.MANIFEST)
    logger.info("checking that %s is unchanged since it was written (sha256 of %s bytes)", path, f"{total:,}")
    for rel, *_ in key:
        if rel != checkpoint_dirs.MANIFEST and _sha256(path / rel) != listed[rel]["sha256"]:
            return (
                f"is an output of openpi-merge-lora whose file {rel} was changed since it was written (its sha256 "
                "differs from its manifest's)"
            )
    if tuple(sorted((rel, *_stat_key_of(path / rel)) for rel, *_ in key)) != key:
        return "is an output of openpi-merge-lora that changed while it was being checked"
    _proven[str(path)] = key
    return None


def _entry_ok(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    )


def _is_failure_record(marker: pathlib.Path) -> bool:
    """Whether `marker` is a merge on save's failure record as it writes it (a JSON object with its fields)."""
    try:
        data = json.loads(marker.read_bytes()) if marker.stat().st_size < (16 << 20) else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and set(data) in _FAILURE_FIELDS and isinstance(data.get("error"), str)


def _holds_lora_params(path: pathlib.Path) -> bool:
    """Whether `path/params` is an Orbax checkpoint with LoRA leaves (by its tree metadata): a LoRA step's."""
    metadata = path / "params" / "_METADATA"
    try:
        return metadata.is_file() and b'"lora_' in metadata.read_bytes()
    except OSError:
        return False


def _walk(root: pathlib.Path, directory: pathlib.Path | None = None) -> Iterator[tuple[str, os.DirEntry]]:
    """(relative path, entry) of everything under `root` that is not a directory, depth first in name order;
    symlinks are not followed. Lazy: a caller that stops early has read only that far."""
    with os.scandir(directory or root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, pathlib.Path(entry.path))
        else:
            yield pathlib.Path(entry.path).relative_to(root).as_posix(), entry


def _files(root: pathlib.Path, limit: int) -> tuple[list[str], bool]:
    """Up to `limit` relative paths of what is under `root` (not directories), and whether there is more."""
    files = []
    for rel, _ in _walk(root):
        if len(files) == limit:
            return files, True
        files.append(rel)
    return files, False


def _stat_key(entry: os.DirEntry) -> tuple[int, int, int, int]:
    st = entry.stat(follow_symlinks=False)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _stat_key_of(path: pathlib.Path) -> tuple[int, int, int, int]:
    try:
        st = os.lstat(path)
    except OSError:
        return (-1, -1, -1, -1)
    if not stat.S_ISREG(st.st_mode):
        return (-1, -1, -1, -1)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _names(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")


def _count(files: list[str], *, more: bool) -> str:
    if more:
        return f"more than {len(files):,} files"
    return f"{len(files)} file{'s' if len(files) != 1 else ''}"
