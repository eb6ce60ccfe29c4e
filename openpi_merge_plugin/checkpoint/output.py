"""Committing an output: write into a temporary sibling, manifest last, then one atomic rename.

The temporary directory is flock()ed for as long as its merge runs, so the cleanup of leftovers of killed merges
never removes the directory of a merge that is still running (the kernel drops the lock when a process dies).
Space is checked before anything is written (`needed_bytes`, an upper bound: `disk_bytes`); a failed write is one
error naming the output (never the temporary directory) and what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
import contextlib
import datetime as dt
import errno
import fcntl
import glob
import hashlib
import json
import os
import pathlib
import re
import shutil
from typing import Any
import uuid

from openpi_merge_plugin import __version__
from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint.output_guard import FAILURE_MARKER  # noqa: F401  (re-exported)
from openpi_merge_plugin.checkpoint.output_guard import MANIFEST
from openpi_merge_plugin.checkpoint.output_guard import MERGED_NAME  # noqa: F401  (re-exported)
from openpi_merge_plugin.checkpoint.output_guard import PYTORCH_NAME  # noqa: F401  (re-exported)
from openpi_merge_plugin.checkpoint.output_guard import not_replaceable
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.errors import OutputExistsError
from openpi_merge_plugin.errors import OutputRefusedError

_TMP_MARK = ".tmp-"
# Write failures the user can fix (space, file-size limit, read-only filesystem), with what to do about them.
_WRITE_ERRNOS = {
    errno.ENOSPC: "free space on its filesystem and run again",
    errno.EDQUOT: "free space or raise the disk quota and run again",
    errno.EFBIG: "a file is larger than the file-size limit (ulimit -f) or the filesystem allows",
    errno.EROFS: "the filesystem is read-only",
    errno.ENAMETOOLONG: "choose a shorter --output (the files inside it have names of their own)",
}
_LEAF_METADATA_BYTES = 2048  # per array: its entries in Orbax's _METADATA, _sharding, array metadata
_MANIFEST_BYTES = (16 << 10, 1 << 10, 512)  # a manifest: fixed, per merged layer slice, per file


@contextlib.contextmanager
def write_errors(output: pathlib.Path, needed_bytes: int | None = None, what: str = "the output") -> Iterator[None]:
    """Turns a failed write (disk full, file-size limit, read-only filesystem, a name too long) into one MergeError
    naming `output` and what to do.

    The error may come as an OSError, as shutil.copytree's list of them, or as TensorStore's error text
    ("[OS error 28: ENOSPC ...]").
    """
    try:
        yield
    except MergeError:
        raise
    except Exception as e:
        code = _errno_of(e)
        if code not in _WRITE_ERRNOS:
            raise
        needs = f" ({what} needs up to {_human(needed_bytes)})" if needed_bytes is not None else ""
        raise MergeError(
            f"cannot write {output}: {os.strerror(code)} ({errno.errorcode[code]}): {_WRITE_ERRNOS[code]}{needs}; "
            "nothing was written"
        ) from e


def disk_bytes(
    file_bytes: Iterable[int],
    *,
    arrays: int = 0,
    merged_slices: int = 0,
    copied: Iterable[pathlib.Path | None] = (),
    block: int = 4096,
) -> int:
    """An upper bound of the disk space an output takes: its files of `file_bytes` (an Orbax array's data may be
    split in several files and is zstd-compressed, which can grow incompressible data by a little), each rounded
    up to `block`, with the metadata of `arrays` Orbax arrays, a manifest recording `merged_slices` layer slices,
    and copies of the directories `copied`."""
    sizes = list(file_bytes)
    total = sum(-(-(n + n // 128) // block) * block for n in sizes)
    files = len(sizes) + 3 * arrays
    total += arrays * (2 * block + _LEAF_METADATA_BYTES) + 16 * block
    for directory in copied:
        if directory is not None and directory.is_dir():
            for path in directory.rglob("*"):
                files += 1
                total += block + (-(-path.stat().st_size // block) * block if path.is_file() else 0)
    fixed, per_slice, per_file = _MANIFEST_BYTES
    return total + fixed + per_slice * merged_slices + per_file * files


def check_space(output: pathlib.Path, needed_bytes: int, what: str = "the output") -> None:
    """Fails before anything is written if the filesystem of `output` has less free space than `needed_bytes`."""
    try:
        stats = os.statvfs(output.parent)
    except OSError:
        return  # the write will say
    free = stats.f_bavail * stats.f_frsize
    if free < needed_bytes:
        raise MergeError(
            f"cannot write {output}: {what} needs up to {_human(needed_bytes)} and its filesystem has "
            f"{_human(free)} free: free space (or choose an --output elsewhere) and run again; nothing was written"
        )


def block_size(output: pathlib.Path) -> int:
    """The allocation unit of the filesystem `output` is written to."""
    try:
        return os.statvfs(output.parent).f_frsize or 4096
    except OSError:
        return 4096


def copy_assets(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Copies the directory `src` (a step's `assets/`, symlinks followed as openpi reads them) to the new `dst`,
    after checking that no link in it leads into `dst` itself or back above itself (which would copy without end)."""
    check_copy(src, dst.parent)
    try:
        shutil.copytree(src, dst)
    except shutil.Error as e:  # every file's error in one exception (a loop gives thousands): the first one
        errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
        if _errno_of(e) in _WRITE_ERRNOS:
            raise
        first = errors[0][2] if errors and len(errors[0]) == 3 else str(e)[:300]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise MergeError(f"cannot copy {src}: {first}{more}") from e


def check_copy(src: pathlib.Path, holder: pathlib.Path) -> None:
    """Fails if copying the directory `src` (links followed) into a new directory made in `holder` would copy
    without end: a link in it that leads to a directory holding `holder`, or back above itself. Run before any work
    with `holder` the output's parent (where its staging directory is made), and again at the copy."""
    target = holder.resolve()
    stack = [(src, pathlib.Path(os.path.realpath(src)), ())]
    while stack:
        directory, real, above = stack.pop()
        if target.is_relative_to(real):
            raise MergeError(
                f"cannot copy {src}: {directory} leads to {real}, which holds the directory being written (a link "
                f"into its own copy): point it at the files themselves"
            )
        if real in above:
            raise MergeError(f"cannot copy {src}: {directory} leads back to {real}, a directory above it (a loop)")
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_dir():  # follows links, as the copy does
                    path = pathlib.Path(entry.path)
                    stack.append((path, pathlib.Path(os.path.realpath(path)), (*above, real)))


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


def temporary_stem(output: pathlib.Path, name_max: int = 255) -> str:
    """What the names of `output`'s temporary siblings start with: `.<name>.tmp-`; for a name too long to take
    the longest suffix (`old-<12 hex>`) within `name_max` bytes, its start and a hash of the whole name."""
    stem = f".{output.name}{_TMP_MARK}"
    if len(os.fsencode(stem)) + len("old-") + 12 <= name_max:
        return stem
    digest = hashlib.sha256(os.fsencode(output.name)).hexdigest()[:8]
    keep = name_max - len("old-") - 12 - len(f"..~{digest}{_TMP_MARK}")
    start = os.fsencode(output.name)[:keep].decode("utf-8", "ignore")
    return f".{start}~{digest}{_TMP_MARK}"


def _name_max(directory: pathlib.Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def leftovers(output: pathlib.Path) -> list[pathlib.Path]:
    """Temporary directories of earlier commands writing `output` that did not finish: `<stem><12 hex>` (a staging
    or scratch directory) and `<stem>old-<12 hex>` (an old output being replaced); `<stem>`: `temporary_stem`."""
    stem = temporary_stem(output, _name_max(output.parent))
    pattern = re.compile(rf"{re.escape(stem)}(old-)?[0-9a-f]{{12}}")
    return sorted(p for p in output.parent.glob(f"{glob.escape(stem)}*") if pattern.fullmatch(p.name))


@contextlib.contextmanager
def staged_directory(
    output: pathlib.Path, *, overwrite: bool, needed_bytes: int | None = None, what: str = "the output"
) -> Iterator[pathlib.Path]:
    """Yields a fresh temporary sibling of `output`; on clean exit renames it to `output` atomically.

    On any error the temporary directory is removed and `output` is left as it was; an error naming the temporary
    directory names `output` instead. `needed_bytes`: checked against the free space first.
    """
    if needed_bytes is not None:
        check_space(output, needed_bytes, what)
    for stale in leftovers(output):
        _remove_if_abandoned(stale)
    with write_errors(output, needed_bytes, what), scratch_directory(output) as tmp:
        try:
            yield tmp
        except MergeError as e:
            if str(tmp) not in str(e):
                raise
            text = str(e).replace(str(tmp), str(output))
            try:
                renamed = type(e)(text)
            except TypeError:  # an error class with another signature
                renamed = MergeError(text)
            raise renamed from e
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
        tmp = output.parent / f"{temporary_stem(output, _name_max(output.parent))}{uuid.uuid4().hex[:12]}"
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
    trash = output.parent / f"{temporary_stem(output, _name_max(output.parent))}old-{uuid.uuid4().hex[:12]}"
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
    root: pathlib.Path,
    on_bytes: Callable[[int], None] | None = None,
    known: Mapping[str, dict[str, int | str]] | None = None,
) -> dict[str, dict[str, int | str]]:
    """sha256 and size of every file under `root` except the manifest, keyed by relative path.

    `on_bytes(n)` is called after each chunk of n bytes hashed (for progress bars). `known`: checksums the caller
    computed from the file's bytes as it read them back (used when the size agrees), so a large file is read once.
    """
    out: dict[str, dict[str, int | str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if known and rel in known and path.is_file() and path.stat().st_size == known[rel]["bytes"]:
            out[rel] = dict(known[rel])
        elif path.is_file() and path.name != MANIFEST:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
                    if on_bytes is not None:
                        on_bytes(len(chunk))
            out[path.relative_to(root).as_posix()] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return out


def manifest_head(format_version: int) -> dict[str, Any]:
    """The fields every manifest of this tool starts with: its format, the plugin and version, when."""
    return {
        "format_version": format_version,
        "plugin": "openpi-merge-plugin",
        "plugin_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def write_manifest(root: pathlib.Path, manifest: dict, known: Mapping[str, dict[str, int | str]] | None = None) -> dict:
    """Adds the checksums of everything already in `root` (`known`: see `file_checksums`) and writes manifest.json
    (the last file written)."""
    manifest = {**manifest, "files": file_checksums(root, known=known)}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest
