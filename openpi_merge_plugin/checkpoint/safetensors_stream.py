"""A `.safetensors` writer that streams: the header comes from shapes and dtypes, then tensors go one at a time.

The bytes are those `safetensors` (`save_file`, `torch.save_model`) writes for the same tensors: u64 little-endian
header length; compact JSON, `__metadata__` first (if given), then one `{"dtype","shape","data_offsets"}` entry per
tensor in data order, padded with spaces to a multiple of 8; then the raw little-endian data, contiguous. Data
order is safetensors': by dtype (F32 before BF16), then by name (byte order). A metadata dict of more than one key
is written in its own order (safetensors' order there is a hash map's, so not reproducible).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Mapping, Sequence
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import struct
import sys
from typing import Any, BinaryIO, Self

import ml_dtypes
import numpy as np

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16)}
_RANK = {"F32": 0, "BF16": 1}  # safetensors sorts dtypes by its enum, descending: F32 > BF16
CHUNK_BYTES = 64 << 20


class SafetensorsWriteError(RuntimeError):
    """A tensor out of order, of the wrong shape/dtype/size, or a file left incomplete."""


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One entry: name, safetensors dtype ("F32" or "BF16"), shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _entries(tensors: Iterable[Any]) -> list[TensorHeader]:
    """Any objects with .name, .dtype, .shape, in safetensors' data order."""
    out = [TensorHeader(t.name, t.dtype, tuple(int(d) for d in t.shape)) for t in tensors]
    for t in out:
        if t.dtype not in DTYPES:
            raise SafetensorsWriteError(f"{t.name}: dtype {t.dtype!r} not supported (only {sorted(DTYPES)})")
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise SafetensorsWriteError("duplicate tensor names")
    return sorted(out, key=lambda t: (_RANK[t.dtype], t.name.encode()))


def header_bytes(tensors: Iterable[Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """The first bytes of the file: length prefix and padded JSON header."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsWriteError("metadata keys and values must be str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in _entries(tensors):
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def file_size(tensors: Iterable[Any], metadata: Mapping[str, str] | None = None) -> int:
    entries = _entries(tensors)
    return len(header_bytes(entries, metadata)) + sum(t.nbytes for t in entries)


def _raw(array: np.ndarray) -> memoryview:
    a = np.ascontiguousarray(array)
    if sys.byteorder == "big":
        a = a.byteswap()
    return memoryview(a.reshape(-1).view(np.uint8))


class _FileWriter:
    """A file written in one `with`: `close` checks it complete; an error, or a failed check, deletes it."""

    path: pathlib.Path
    _f: BinaryIO | None

    def abort(self) -> None:
        """Close and delete the incomplete file."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.close()
        except BaseException:
            self.abort()
            raise


class StreamWriter(_FileWriter):
    """Writes the header on open; then `write` (or `write_zeros`) each tensor in `order`; `close` checks the size.

    Leaving a `with` block by an exception removes the incomplete file.
    """

    def __init__(self, path: str | os.PathLike, tensors: Iterable[Any], metadata: Mapping[str, str] | None = None):
        self.path = pathlib.Path(path)
        self.order: list[TensorHeader] = _entries(tensors)
        self._header = header_bytes(self.order, metadata)
        self.size = len(self._header) + sum(t.nbytes for t in self.order)
        self._next = 0
        self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115
        self._written = self._f.write(self._header)

    @property
    def next(self) -> TensorHeader | None:
        """The tensor to write next (None when all are written)."""
        return self.order[self._next] if self._next < len(self.order) else None

    def _expect(self, name: str) -> TensorHeader:
        if self._f is None:
            raise SafetensorsWriteError(f"{self.path}: writer is closed")
        t = self.next
        if t is None or t.name != name:
            raise SafetensorsWriteError(f"{self.path}: got {name!r}, expected {t.name if t else 'no more tensors'!r}")
        return t

    def _put(self, t: TensorHeader, chunks: Iterable[memoryview]) -> None:
        n = sum(self._f.write(c) for c in chunks)
        self._written += n
        if n != t.nbytes:
            raise SafetensorsWriteError(f"{self.path}: {t.name} wrote {n} bytes, expected {t.nbytes}")
        self._next += 1

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next tensor; its dtype and shape must be the declared ones."""
        t = self._expect(name)
        array = np.asarray(array)
        if array.dtype != DTYPES[t.dtype] or tuple(array.shape) != t.shape:
            raise SafetensorsWriteError(
                f"{self.path}: {name} is {array.dtype}{list(array.shape)}, declared {t.dtype}{list(t.shape)}"
            )
        self._put(t, [_raw(array)])

    def write_zeros(self, name: str) -> None:
        """Write the next tensor as zeros, in chunks of at most CHUNK_BYTES."""
        t = self._expect(name)
        zero = memoryview(bytes(min(t.nbytes, CHUNK_BYTES)))
        self._put(t, (zero[: min(CHUNK_BYTES, t.nbytes - i)] for i in range(0, t.nbytes, CHUNK_BYTES)))

    def close(self) -> None:
        """Finish the file: every tensor must have been written, and the file must have the planned size."""
        if self._f is None:
            return
        f, self._f = self._f, None
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if self.next is not None:
            raise SafetensorsWriteError(f"{self.path}: closed before {self.next.name} ({len(self.order)} tensors)")
        if self._written != self.size or self.path.stat().st_size != self.size:
            raise SafetensorsWriteError(f"{self.path}: {self.path.stat().st_size} bytes, expected {self.size}")


def write(
    path: str | os.PathLike,
    tensors: Sequence[Any],
    produce: Callable[[Any], np.ndarray | None],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write `tensors` (objects with .name/.dtype/.shape), asking `produce(t)` for each in file order.

    `produce` gets the caller's own object; None from it writes zeros. At most one tensor is held at a time.
    """
    by_name = {t.name: t for t in tensors}
    with StreamWriter(path, tensors, metadata) as w:
        while (t := w.next) is not None:
            array = produce(by_name[t.name])
            if array is None:
                w.write_zeros(t.name)
            else:
                w.write(t.name, array)
            del array


class PositionalWriter(_FileWriter):
    """Writes the header on open, then each tensor at its own offset, in any order (a tensor's row blocks in
    order); hashes each tensor's bytes (sha256) as they are written. `close` checks that every byte was written and
    returns the digests (name -> hex); `read_back` proves the file against them.

    Leaving a `with` block by an exception removes the incomplete file.
    """

    def __init__(self, path: str | os.PathLike, tensors: Iterable[Any], metadata: Mapping[str, str] | None = None):
        self.path = pathlib.Path(path)
        self.order: list[TensorHeader] = _entries(tensors)
        self.header = header_bytes(self.order, metadata)
        self.size = len(self.header) + sum(t.nbytes for t in self.order)
        self._entry = {t.name: t for t in self.order}
        self._offset: dict[str, int] = {}
        offset = len(self.header)
        for t in self.order:
            self._offset[t.name], offset = offset, offset + t.nbytes
        self._done: dict[str, int] = {}  # bytes written of each tensor begun
        self._hash: dict[str, Any] = {}
        self.digests: dict[str, str] = {}
        self._f: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115
        self._f.write(self.header)

    def write(self, name: str, array: np.ndarray, rows: slice | None = None) -> None:
        """Writes tensor `name` whole, or its `rows` (a range of axis 0; the ranges of a tensor in order)."""
        t = self._begin(name)
        array = np.asarray(array)
        start, stop = (0, t.shape[0] if t.shape else 1) if rows is None else (rows.start, rows.stop)
        want = t.shape if rows is None else (stop - start, *t.shape[1:])
        if array.dtype != DTYPES[t.dtype] or tuple(array.shape) != tuple(want):
            raise SafetensorsWriteError(
                f"{self.path}: {name}[{start}:{stop}] is {array.dtype}{list(array.shape)}, declared "
                f"{t.dtype}{list(want)}"
            )
        row_bytes = t.nbytes // t.shape[0] if t.shape and t.shape[0] else t.nbytes
        self._put(t, start * row_bytes, _raw(array))

    def write_zeros(self, name: str) -> None:
        """Writes tensor `name` as zeros, in chunks of at most CHUNK_BYTES."""
        t = self._begin(name)
        zero = memoryview(bytes(min(t.nbytes, CHUNK_BYTES)))
        for at in range(0, max(t.nbytes, 1), CHUNK_BYTES):
            self._put(t, at, zero[: min(CHUNK_BYTES, t.nbytes - at)])

    def _begin(self, name: str) -> TensorHeader:
        if self._f is None:
            raise SafetensorsWriteError(f"{self.path}: writer is closed")
        if name not in self._entry:
            raise SafetensorsWriteError(f"{self.path}: {name!r} is not a tensor of this file")
        if name in self.digests:
            raise SafetensorsWriteError(f"{self.path}: {name!r} written twice")
        return self._entry[name]

    def _put(self, t: TensorHeader, at: int, data: memoryview) -> None:
        done = self._done.get(t.name, 0)
        if at != done:
            raise SafetensorsWriteError(f"{self.path}: {t.name}: bytes from {at} given, expected from {done}")
        digest = self._hash.setdefault(t.name, hashlib.sha256())
        digest.update(data)
        n = os.pwrite(self._f.fileno(), data, self._offset[t.name] + at)
        while n < len(data):  # a short write (large buffers, signals): the rest
            n += os.pwrite(self._f.fileno(), data[n:], self._offset[t.name] + at + n)
        self._done[t.name] = done + len(data)
        if self._done[t.name] > t.nbytes:
            raise SafetensorsWriteError(f"{self.path}: {t.name}: more than its {t.nbytes} bytes")
        if self._done[t.name] == t.nbytes:
            self.digests[t.name] = self._hash.pop(t.name).hexdigest()

    def close(self) -> dict[str, str]:
        """Finishes the file (fsync); every tensor must be complete. Returns the digests."""
        if self._f is not None:
            f, self._f = self._f, None
            f.flush()
            os.fsync(f.fileno())
            f.close()
            missing = [t.name for t in self.order if t.name not in self.digests]
            if missing:
                raise SafetensorsWriteError(f"{self.path}: closed before {missing[0]} ({len(missing)} tensors missing)")
            if self.path.stat().st_size != self.size:
                raise SafetensorsWriteError(f"{self.path}: {self.path.stat().st_size} bytes, expected {self.size}")
        return self.digests


class InBackground:
    """Runs calls in one worker thread, in order, at most `depth` of them waiting: hashing and writing a tensor
    (both release the GIL) overlap laying out the next one. An error comes back from `submit` or the `with`."""

    def __init__(self, depth: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="safetensors-write")
        self._pending: collections.deque[concurrent.futures.Future] = collections.deque()
        self._depth = depth

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(fn, *args))

    def __enter__(self) -> InBackground:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                for future in self._pending:
                    future.cancel()
            while self._pending:
                future = self._pending.popleft()
                if not future.cancelled() and exc_type is None:
                    future.result()
        finally:
            self._pool.shutdown(wait=True)


def _check_digest(path: pathlib.Path, name: str, digest: Any, want: str) -> None:
    if digest.hexdigest() != want:
        raise SafetensorsWriteError(f"{path}: tensor {name} does not read back as written")


@dataclasses.dataclass(frozen=True)
class ReadBack:
    """What `read_back` proved: `safe_open` opens the file and reports every tensor as written; every tensor's bytes,
    read at the header's offsets, hash as written, and its first and last rows are those `safe_open` reads; and
    the file's sha256."""

    tensors_checked: int
    file_sha256: str
    bytes: int


def read_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fills `buffer` with the file's bytes from `offset` (short reads continued; end of file is an error)."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n <= 0:
            raise SafetensorsWriteError(f"file ends at {offset + done}, {len(buffer) - done} bytes short")
        done += n


def _safe_open_view(path: pathlib.Path, entries: Mapping[str, Any]) -> dict[str, tuple[bytes, bytes]]:
    """Opens the file with the `safetensors` library: its tensors must be `entries` (names, dtypes, shapes);
    returns each tensor's first and last row (whole if 0-d) as that library reads them, for the cross-check."""
    from safetensors import safe_open

    rows: dict[str, tuple[bytes, bytes]] = {}
    with safe_open(str(path), framework="numpy") as f:
        if set(f.keys()) != set(entries):
            raise SafetensorsWriteError(f"{path}: the file's tensors are not those written")
        for name, entry in entries.items():
            view, shape = f.get_slice(name), entry["shape"]
            if view.get_dtype() != entry["dtype"] or list(view.get_shape()) != shape:
                raise SafetensorsWriteError(f"{path}: {name} reads back as {view.get_dtype()}{view.get_shape()}")
            if not shape:
                whole = bytes(_raw(f.get_tensor(name)))
                rows[name] = (whole, whole)
            elif shape[0]:
                rows[name] = (bytes(_raw(view[0:1])), bytes(_raw(view[shape[0] - 1 : shape[0]])))
    return rows


def read_back(
    path: str | os.PathLike, digests: Mapping[str, str], header: bytes, block_bytes: int = CHUNK_BYTES
) -> ReadBack:
    """Proves the file against `digests` (each tensor's sha256 as written) and `header` (as written).

    The `safetensors` library's `safe_open` must open the file and report every tensor's name, dtype and shape as
    written. Then the file is read once, in order, with `os.preadv` at the header's offsets into two reused buffers
    of at most `block_bytes` (whole rows): each tensor's bytes must hash as written, and its first and last rows
    must be those `safe_open` reads (its own data path agrees with the offsets). The file's sha256 comes from the
    same reads; the two hashes run in two worker threads while the next block is read (hashlib releases the GIL).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        if f.read(len(header)) != header:
            raise SafetensorsWriteError(f"{path}: the header does not read back as written")
    entries = json.loads(header[8:])
    entries.pop("__metadata__", None)
    if set(entries) != set(digests):
        raise SafetensorsWriteError(f"{path}: the file's tensors are not those written")
    rows = _safe_open_view(path, entries)
    plan = []  # (name, offset in the file, bytes, bytes of a block: whole rows)
    for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = entry["data_offsets"]
        n_rows = entry["shape"][0] if entry["shape"] else 1
        row = (end - begin) // n_rows if n_rows else 0
        plan.append((name, len(header) + begin, end - begin, max(1, row, row * (block_bytes // max(row, 1)))))
    buffers = [bytearray(max((p[3] for p in plan), default=0)) for _ in range(2)]
    whole = hashlib.sha256(header)
    size, turn = len(header), 0
    fd = os.open(path, os.O_RDONLY)
    try:
        # depth 1: a buffer is refilled only after both hashes of its last block are done
        with InBackground(depth=1) as tensor_hashes, InBackground(depth=1) as file_hash:
            for name, offset, nbytes, step in plan:
                digest = hashlib.sha256()
                for at in range(0, nbytes, step):
                    data = memoryview(buffers[turn])[: min(step, nbytes - at)]
                    turn ^= 1
                    read_into(fd, data, offset + at)
                    first, last = rows.get(name, (b"", b""))
                    if (at == 0 and data[: len(first)] != first) or (
                        at + len(data) == nbytes and data[len(data) - len(last) :] != last
                    ):
                        raise SafetensorsWriteError(f"{path}: {name} is not at its offsets as safe_open reads it")
                    tensor_hashes.submit(digest.update, data)
                    file_hash.submit(whole.update, data)
                    size += len(data)
                tensor_hashes.submit(_check_digest, path, name, digest, digests[name])
    finally:
        os.close(fd)
    if size != path.stat().st_size:
        raise SafetensorsWriteError(f"{path}: {path.stat().st_size} bytes, read back {size}")
    return ReadBack(len(entries), whole.hexdigest(), size)
