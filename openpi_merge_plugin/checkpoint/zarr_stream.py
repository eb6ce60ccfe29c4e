"""Reading a large array of an Orbax (OCDBT, zarr v2) checkpoint a slice at a time, by stream-decoding its chunks.

TensorStore decodes a chunk whole before it hands out any of it, and holds the compressed chunk while it does. A
one-device training run writes each weight in few chunks: pi0's gating einsum is two chunks of 1.1 GiB (0.9 GB
compressed each), so reading one layer of it through TensorStore costs 4 GB. The format leaves room to do better:
- OCDBT stores each chunk as raw bytes at an offset of one of its data files (`tensorstore.ocdbt.dump` says where);
- a zarr v2 chunk is its C-order bytes, zstd-compressed (one frame) or not compressed;
- in C order, the elements with given leading indices are one contiguous run of a chunk.
So a layer (or a range of rows) is read by decoding each chunk of its chunk row as a stream, up to that run, into
the output: memory is the output and one chunk piece, never a whole chunk. Slices read in order (as the merge and the
export read them) decode each chunk once; going back restarts that chunk's stream.

`open_streamed` takes an array only in a layout it knows (zarr v2, zstd or no compressor, no filters, C order, a
little-endian numeric dtype, every chunk stored out of line in a data file under the checkpoint) with chunks of at
least `STREAM_MIN_CHUNK_BYTES`; for anything else it returns None and the caller reads through TensorStore.
"""

from __future__ import annotations

from collections.abc import Mapping
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
from typing import Any

import ml_dtypes
import numpy as np

logger = logging.getLogger("openpi_merge_plugin")

# Chunks smaller than this are read through TensorStore: decoding one whole costs little.
STREAM_MIN_CHUNK_BYTES = 64 << 20
_SKIP_BYTES = 16 << 20  # what skipping forward in a stream decodes at a time
_FILE_READ_BYTES = 4 << 20  # what a stream reads from its data file at a time


class StreamReadError(RuntimeError):
    """A chunk that does not decode to its zarr size (truncated or corrupted data)."""


@dataclasses.dataclass(frozen=True)
class ValueRef:
    """Where OCDBT stores a value out of line: `length` bytes at `offset` of `file`."""

    file: pathlib.Path
    offset: int
    length: int


class OcdbtIndex:
    """Every key of an OCDBT database (its latest version) -> its value (inline bytes) or where it is (ValueRef)."""

    def __init__(self, root: pathlib.Path, values: Mapping[bytes, bytes | ValueRef]):
        self.root = root
        self.values = dict(values)

    @classmethod
    def load(cls, root: pathlib.Path) -> OcdbtIndex | None:
        """The index of the database at `root` (a directory with manifest.ocdbt); None if it cannot be listed."""
        import tensorstore as ts

        root = pathlib.Path(root).resolve()
        if not (root / "manifest.ocdbt").is_file():
            return None
        base = ts.KvStore.open(f"file://{root}/").result()
        manifest = ts.ocdbt.dump(base).result()
        versions = [v for v in manifest.get("versions", []) if "generation_number" in v]
        if not versions or manifest.get("version_tree_nodes"):
            return None  # older versions in a version tree: the latest is still in `versions`, but keep it simple
        latest = max(versions, key=lambda v: v["generation_number"])
        location = latest.get("root", {}).get("location")
        values: dict[bytes, bytes | ValueRef] = {}
        if location is None:
            return cls(root, values)  # an empty database

        def walk(node_location: str, prefix: bytes) -> None:
            node = ts.ocdbt.dump(base, node_location).result()
            for entry in node["entries"]:
                if "location" in entry:  # an interior node: keys below it are relative to its common prefix
                    walk(entry["location"], prefix + entry.get("subtree_common_prefix", b""))
                elif "inline_value" in entry:
                    values[prefix + entry["key"]] = entry["inline_value"]
                else:
                    values[prefix + entry["key"]] = _value_ref(root, entry["indirect_value"])

        walk(location, b"")
        return cls(root, values)

    def read(self, key: bytes) -> bytes | None:
        value = self.values.get(key)
        if value is None or isinstance(value, bytes):
            return value
        with open(value.file, "rb") as f:
            return os.pread(f.fileno(), value.length, value.offset)


def _value_ref(root: pathlib.Path, text: str) -> ValueRef:
    """'value:<base path>:<relative path>:<offset>:<length>' (tensorstore.ocdbt.dump's form) -> a ValueRef."""
    kind, rest = text.split(":", 1)
    paths, offset, length = rest.rsplit(":", 2)
    base, relative = paths.split(":", 1)
    file = (root / base / relative).resolve()
    if kind != "value" or not file.is_relative_to(root):
        raise ValueError(f"unexpected OCDBT value reference {text!r}")
    return ValueRef(file, int(offset), int(length))


@functools.cache
def _read_ahead_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One worker for every array's read-ahead: at most one slice is read ahead at a time."""
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zarr-read-ahead")


@functools.cache
def zstd_available() -> bool:
    """Whether python-zstandard imports (a dependency, but an environment installed with --no-deps may lack it);
    without it, zstd chunks are read through TensorStore, whole, as before streaming (more memory, same values)."""
    try:
        import zstandard  # noqa: F401
    except ImportError as e:
        logger.warning(
            "zstandard is not importable (%s): large checkpoint chunks are read through TensorStore, decoding each "
            "whole chunk (more memory); pip install zstandard to stream them",
            e,
        )
        return False
    return True


def _dtype(zarr_dtype: Any) -> np.dtype | None:
    """The numpy dtype of a zarr v2 dtype, if it is a little-endian (or one-byte) number; else None."""
    if zarr_dtype == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if not isinstance(zarr_dtype, str) or zarr_dtype[:1] not in "<|" or zarr_dtype[1:2] not in ("f", "i", "u", "b"):
        return None
    return np.dtype(zarr_dtype).newbyteorder("=")


# (rows of axis 0, ints fixing the next axes, whether the rows axis is dropped): what one `x[index]` reads.
_Request = tuple[range, tuple[int, ...], bool]


@dataclasses.dataclass(eq=False)
class StreamedArray:
    """A zarr v2 array of an OCDBT checkpoint, read by `x[index]`: `()` (all of it), ints into the leading axes,
    or a `slice` of the first axis (step 1).

    After each read, the next one in order (the next layer, the next block of rows) is read ahead in a worker thread
    (zstd and the copies release the GIL), so that decoding overlaps what the caller does with the slice it has.
    """

    path: str  # the leaf's path, for errors
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...]
    compressed: bool
    refs: Mapping[tuple[int, ...], ValueRef]  # chunk grid position -> its bytes
    streams: dict[tuple[int, ...], _ChunkStream] = dataclasses.field(default_factory=dict)
    _ahead: tuple[_Request, concurrent.futures.Future] | None = None

    def __getitem__(self, index: Any) -> np.ndarray:
        request = self._request(index)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == request:
            out = ahead[1].result()
        else:
            if ahead is not None and not ahead[1].cancel():
                concurrent.futures.wait([ahead[1]])  # the streams are the worker's until it is done
            out = self._read(request)
        following = self._following(request)
        if following is not None:
            self._ahead = (following, _read_ahead_pool().submit(self._read, following))
        return out

    def _request(self, index: Any) -> _Request:
        if isinstance(index, slice):
            index = (index,)
        if not isinstance(index, tuple):
            index = (index,)
        if len(index) == 1 and isinstance(index[0], slice):
            start, stop, step = index[0].indices(self.shape[0])
            if step != 1:
                raise IndexError(f"{self.path}: only a step of 1 is read streamed")
            return range(start, max(start, stop)), (), False
        if not all(isinstance(i, int | np.integer) for i in index) or len(index) > len(self.shape):
            raise IndexError(f"{self.path}: {index!r} is not read streamed")
        index = tuple(int(i) for i in index)
        for i, n in zip(index, self.shape, strict=False):
            if not 0 <= i < n:
                raise IndexError(f"{self.path}: index {index} out of bounds for shape {self.shape}")
        if not self.shape:
            return range(1), (), True
        rows = range(self.shape[0]) if not index else range(index[0], index[0] + 1)
        return rows, index[1:], bool(index)

    def _following(self, request: _Request) -> _Request | None:
        """The request that comes next in order (None after the last, or after a whole read)."""
        rows, fixed, squeeze = request
        if not squeeze:
            if not self.shape or rows.stop >= self.shape[0] or not len(rows) or len(rows) == self.shape[0]:
                return None
            return range(rows.stop, min(rows.stop + len(rows), self.shape[0])), (), False
        index = [rows.start, *fixed]
        for axis in reversed(range(len(index))):  # the next index in C order
            index[axis] += 1
            if index[axis] < self.shape[axis]:
                return range(index[0], index[0] + 1), tuple(index[1:]), True
            index[axis] = 0
        return None

    def _read(self, request: _Request) -> np.ndarray:
        """Rows `rows` of axis 0 with the next axes fixed at `fixed`: shape (len(rows), *shape[1 + len(fixed):]),
        without the rows axis if `squeeze`."""
        rows, fixed, squeeze = request
        k = 1 + len(fixed) if self.shape else 0
        trailing, trailing_chunks = self.shape[k:], self.chunks[k:]
        out = np.empty((len(rows), *trailing), self.dtype)
        c0 = self.chunks[0] if self.shape else 1
        fixed_grid = tuple(i // c for i, c in zip(fixed, self.chunks[1:k], strict=True))
        fixed_local = tuple(i % c for i, c in zip(fixed, self.chunks[1:k], strict=True))
        run = math.prod(trailing_chunks)  # elements of one local row (leading indices fixed) of a chunk
        grid = tuple(-(-n // c) for n, c in zip(trailing, trailing_chunks, strict=True))
        whole_rows = trailing == trailing_chunks  # one chunk per row, as wide as the array: decode into `out`
        for row_chunk in range(rows.start // c0, (rows.stop - 1) // c0 + 1) if len(rows) else ():
            lo, hi = max(rows.start, row_chunk * c0), min(rows.stop, (row_chunk + 1) * c0)
            first = np.ravel_multi_index((lo - row_chunk * c0, *fixed_local), self.chunks[:k]) if k else 0
            at = int(first) * run * self.dtype.itemsize
            target = out[lo - rows.start : hi - rows.start]
            for position in np.ndindex(*grid):
                stream = self._stream((row_chunk, *fixed_grid, *position) if self.shape else ())
                if whole_rows:
                    stream.read_into(at, target)
                    continue
                piece = np.empty((hi - lo, *trailing_chunks), self.dtype)
                stream.read_into(at, piece)
                region = tuple(
                    slice(p * c, min((p + 1) * c, n))
                    for p, c, n in zip(position, trailing_chunks, trailing, strict=True)
                )
                target[(slice(None), *region)] = piece[(slice(None), *(slice(0, r.stop - r.start) for r in region))]
                del piece
        return out.reshape(out.shape[1:]) if squeeze else out

    def _stream(self, key: tuple[int, ...]) -> _ChunkStream:
        stream = self.streams.get(key)
        if stream is None:
            chunk_bytes = math.prod(self.chunks) * self.dtype.itemsize
            stream = self.streams[key] = _ChunkStream(self.refs[key], chunk_bytes, compressed=self.compressed)
        return stream


class _ChunkStream:
    """One chunk's bytes, decoded in order; `read_into(at, out)` from byte `at` (restarting if it is behind)."""

    def __init__(self, ref: ValueRef, nbytes: int, *, compressed: bool):
        self._ref, self._nbytes, self._compressed = ref, nbytes, compressed
        self._reader: Any = None
        self._at = 0

    def _open(self) -> None:
        source = _FileRange(self._ref)
        if self._compressed:
            import zstandard

            self._reader = zstandard.ZstdDecompressor().stream_reader(
                source, read_size=_FILE_READ_BYTES, read_across_frames=True
            )
        else:
            self._reader = source
        self._at = 0

    def read_into(self, at: int, out: np.ndarray) -> None:
        """Fills the C-contiguous `out` with the chunk's bytes from byte `at`."""
        if self._reader is None or at < self._at:
            self._open()
        while self._at < at:  # skip forward
            self._fill(memoryview(bytearray(min(_SKIP_BYTES, at - self._at))))
        self._fill(memoryview(out.reshape(-1).view(np.uint8)))
        if self._at == self._nbytes:
            self._check_end()

    def _fill(self, buffer: memoryview) -> None:
        done = 0
        while done < len(buffer):
            n = self._reader.readinto(buffer[done:])
            if not n:
                raise StreamReadError(
                    f"chunk data ends after {self._at + done} of {self._nbytes} bytes ({self._ref.file.name})"
                )
            done += n
        self._at += done

    def _check_end(self) -> None:
        if self._reader.read(1):
            raise StreamReadError(f"chunk data is longer than {self._nbytes} bytes ({self._ref.file.name})")
        self._reader.close()
        self._reader = None


class _FileRange:
    """The bytes [offset, offset + length) of a file, as a readable stream (read, readinto)."""

    def __init__(self, ref: ValueRef):
        self._fd = -1
        self._fd = os.open(ref.file, os.O_RDONLY)
        if os.fstat(self._fd).st_size < ref.offset + ref.length:
            self.close()
            raise StreamReadError(f"{ref.file} is shorter than the chunk stored in it (truncated?)")
        self._at, self._end = ref.offset, ref.offset + ref.length

    def read(self, n: int = -1) -> bytes:
        n = self._end - self._at if n is None or n < 0 else min(n, self._end - self._at)
        data = os.pread(self._fd, n, self._at) if n > 0 else b""
        self._at += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._end - self._at)
        got = os.preadv(self._fd, [view[:n]], self._at) if n > 0 else 0
        self._at += got
        return got

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def open_streamed(index: OcdbtIndex, name: str, path: str) -> StreamedArray | None:
    """Array `name` (its key prefix in the database) as a StreamedArray, or None if it is not in a layout read
    streamed (see the module's docstring)."""
    metadata = index.read(f"{name}/.zarray".encode())
    if metadata is None:
        return None
    try:
        zarray = json.loads(metadata)
    except ValueError:
        return None
    dtype = _dtype(zarray.get("dtype"))
    compressor = zarray.get("compressor")
    shape, chunks = tuple(zarray.get("shape", ())), tuple(zarray.get("chunks", ()))
    if (
        zarray.get("zarr_format") != 2
        or dtype is None
        or zarray.get("order") != "C"
        or zarray.get("filters")
        or not (compressor is None or (compressor.get("id") == "zstd" and zstd_available()))
        or len(shape) != len(chunks)
        or not all(isinstance(c, int) and c > 0 for c in chunks)
        or math.prod(chunks) * dtype.itemsize < STREAM_MIN_CHUNK_BYTES
    ):
        return None
    separator = zarray.get("dimension_separator", ".")
    refs = {}
    for position in np.ndindex(*(-(-n // c) for n, c in zip(shape, chunks, strict=True))):
        key = separator.join(map(str, position)) if shape else "0"
        ref = index.values.get(f"{name}/{key}".encode())
        if not isinstance(ref, ValueRef):
            return None  # a chunk stored inline or not at all (fill value): TensorStore reads it
        refs[position] = ref
    return StreamedArray(path, shape, dtype, chunks, compressor is not None, refs)
