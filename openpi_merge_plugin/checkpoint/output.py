"""Committing a merged checkpoint: write into a temporary sibling, manifest last, then one atomic rename.

The temporary directory is flock()ed for as long as its merge runs, so the cleanup of leftovers of killed merges
never removes the directory of a merge that is still running (the kernel drops the lock when a process dies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import uuid

from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.errors import OutputExistsError
from openpi_merge_plugin.errors import OutputRefusedError

MANIFEST = "manifest.json"
# What the tool writes into a LoRA step: the merged checkpoint, and its PyTorch export (offline or on save).
MERGED_NAME = "merged"
PYTORCH_NAME = "merged_pytorch"
STEP_OUTPUT_NAMES = (MERGED_NAME, PYTORCH_NAME)
PLUGIN = "openpi-merge-plugin"  # the manifest's "plugin" field, which marks an output of this tool
# Written instead of a checkpoint when a merge on save fails (training goes on).
FAILURE_MARKER = "MERGE_FAILED.json"
_TMP_MARK = ".tmp-"
# Write failures the user can fix (space, file-size limit, read-only filesystem), with what to do about them.
_WRITE_ERRNOS = {
    errno.ENOSPC: "free space on its filesystem and run again",
    errno.EDQUOT: "free space or raise the disk quota and run again",
    errno.EFBIG: "a file is larger than the file-size limit (ulimit -f) or the filesystem allows",
    errno.EROFS: "the filesystem is read-only",
}


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


@contextlib.contextmanager
def write_errors(output: pathlib.Path, needed_bytes: int) -> Iterator[None]:
    """Turns a failed write (disk full, file-size limit, read-only filesystem) into a MergeError saying so.

    The error may come as an OSError or as TensorStore's error text ("[OS error 28: ENOSPC ...]").
    """
    try:
        yield
    except MergeError:
        raise
    except Exception as e:
        code = _errno_of(e)
        if code not in _WRITE_ERRNOS:
            raise
        raise MergeError(
            f"cannot write {output}: {os.strerror(code)} ({errno.errorcode[code]}): {_WRITE_ERRNOS[code]} "
            f"(the merged checkpoint needs up to {_human(needed_bytes)}); nothing was written"
        ) from e


def _errno_of(e: BaseException) -> int | None:
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        # TensorStore names the errno in its text (in a form that depends on its version); shutil.copytree:
        # "[Errno 28] No space left ...".
        code = orbax_compat.os_error_code(str(e))
        if code is not None:
            return code
        found = re.search(r"\[Errno (\d+)\]", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def leftovers(output: pathlib.Path) -> list[pathlib.Path]:
    """Temporary directories of earlier commands writing `output` that did not finish: `.<name>.tmp-<12 hex>` (a
    staging or scratch directory) and `.<name>.tmp-old-<12 hex>` (an old output being replaced)."""
    pattern = re.compile(rf"\.{re.escape(output.name)}{re.escape(_TMP_MARK)}(old-)?[0-9a-f]{{12}}")
    return sorted(p for p in output.parent.glob(f".{output.name}{_TMP_MARK}*") if pattern.fullmatch(p.name))


@contextlib.contextmanager
def staged_directory(output: pathlib.Path, *, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary sibling of `output`; on clean exit renames it to `output` atomically.

    On any error the temporary directory is removed and `output` is left as it was.
    """
    for stale in leftovers(output):
        _remove_if_abandoned(stale)
    with scratch_directory(output) as tmp:
        yield tmp
        _commit(tmp, output, overwrite=overwrite)


@contextlib.contextmanager
def scratch_directory(output: pathlib.Path) -> Iterator[pathlib.Path]:
    """A fresh, locked temporary sibling of `output`, removed on exit (unless renamed away); a killed command's is
    a leftover that the next command writing `output` removes."""
    tmp, lock = _locked_tmp(output)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _locked_tmp(output: pathlib.Path) -> tuple[pathlib.Path, int]:
    while True:
        tmp = output.parent / f".{output.name}{_TMP_MARK}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        lock = _try_lock(tmp)
        if lock is None:
            continue
        # Between mkdir and flock another merge may have taken it for a leftover and removed it: take a new one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(tmp).st_ino == os.fstat(lock).st_ino:
                return tmp, lock
        os.close(lock)


def _remove_if_abandoned(path: pathlib.Path) -> None:
    if path.is_symlink() or not path.is_dir():
        return  # never made by this tool
    lock = _try_lock(path)
    if lock is None:
        return  # a running merge holds it
    try:
        shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(lock)


def _try_lock(path: pathlib.Path) -> int | None:
    """A descriptor of `path` holding an exclusive flock, or None if another process holds it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        pass  # a filesystem without flock: no protection against a concurrent merge, as without the lock
    return fd


def _commit(tmp: pathlib.Path, output: pathlib.Path, *, overwrite: bool) -> None:
    _fsync_tree(tmp)
    appeared = f"output {output} appeared while merging (another merge?); nothing was replaced"
    exists = output.is_symlink() or output.exists()
    if exists and not overwrite:
        raise OutputExistsError(appeared)
    if exists and (why_not := not_replaceable(output)) is not None:  # checked again: it may have changed meanwhile
        raise OutputRefusedError(f"--output {output} {why_not}; nothing was replaced")
    trash = output.parent / f".{output.name}{_TMP_MARK}old-{uuid.uuid4().hex[:12]}"
    moved_aside = committed = False
    try:
        if exists:
            output.rename(trash)
            moved_aside = True
        tmp.rename(output)  # atomic; fails if another merge committed `output` in the meantime
        committed = True
    except OSError as e:
        restored = not moved_aside
        if moved_aside:
            with contextlib.suppress(OSError):
                trash.rename(output)  # the earlier output back in its place
                restored = True
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOENT):
            # Another merge committed meanwhile; its output stays. The old one was being replaced anyway.
            if not restored:
                shutil.rmtree(trash, ignore_errors=True)
            raise OutputExistsError(appeared) from e
        kept = "the earlier output is left as it was" if restored else f"the earlier output is kept in {trash}"
        raise MergeError(
            f"cannot commit {output}: {e.strerror or e} ({errno.errorcode.get(e.errno or 0, 'error')}); "
            + (kept if exists else "nothing was written")
        ) from e
    finally:
        if committed and moved_aside:
            shutil.rmtree(trash, ignore_errors=True)


def _fsync_tree(root: pathlib.Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(
    root: pathlib.Path, on_bytes: Callable[[int], None] | None = None
) -> dict[str, dict[str, int | str]]:
    """sha256 and size of every file under `root` except the manifest, keyed by relative path.

    `on_bytes(n)` is called after each chunk of n bytes hashed (for progress bars).
    """
    out: dict[str, dict[str, int | str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            out[path.relative_to(root).as_posix()] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return out


def write_manifest(root: pathlib.Path, manifest: dict) -> dict:
    """Adds the checksums of everything already in `root` and writes manifest.json (the last file written)."""
    manifest = {**manifest, "files": file_checksums(root)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest
