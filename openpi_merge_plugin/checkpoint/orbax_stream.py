"""Writing an Orbax PyTree checkpoint one leaf slice at a time, so memory does not grow with the model.

Orbax's `PyTreeCheckpointer.save` needs the whole tree in memory and copies every array to host before writing
(and, with OCDBT, keeps the written data in one transaction until all of it is committed), so saving a 7 GB tree
costs about twice that. Its public API has no incremental save, but it has the supported extension point for
exactly this: a `TypeHandler` for a custom leaf type, given to `PyTreeCheckpointHandler` in its own registry.

`StreamingArrayHandler` is that handler. Every leaf of the tree is a `PendingLeaf` placeholder (path, shape,
dtype); Orbax plans the save as usual (parameter names, OCDBT layout, `_METADATA`, `_CHECKPOINT_METADATA`, the
final OCDBT merge, the atomic rename) and hands all placeholders to `serialize`, which pulls the real values from
a stream and writes each one, slice by slice, before pulling the next.

Why the result is an ordinary checkpoint: each array is written by the same code path as Orbax's own `ArrayHandler`
(the same TensorStore spec builder, the same zarr metadata and OCDBT kvstore, the same sharding and ArrayMetadata
records, typestr `jax.Array`). The only difference is the write shape: a weight with scanned layers is written
as if it were sharded along its layer axis (one chunk row per layer), and a large layer slice, which the engine
merges in column pieces, as if also sharded along its last axis (one chunk per piece); that is how Orbax writes an
FSDP-sharded array. Readers (`restore_params`, `PyTreeCheckpointer.restore`, `metadata`) do not depend on the write
shape.
Below Orbax's public API it needs the spec builders `ArrayHandler` itself uses; those, which moved between Orbax
versions, come from `orbax_compat`. The tests compare its output with `PyTreeCheckpointer.save` leaf by leaf,
bitwise, and read it with the other end of the supported version range (`tests/test_stacks.py`).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

from openpi_merge_plugin.checkpoint import host_memory
from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import sources as _sources
from openpi_merge_plugin.lora.adapters import ShapeDtype

# Data handed to TensorStore but not yet written, at most (one more piece may be in flight beyond it). Enough to
# overlap writing with merging: on the CI machine 64 MiB merges as fast as 512 MiB (docs/benchmark.md §4).
MAX_INFLIGHT_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class PendingLeaf:
    """A leaf whose value is produced later by the stream; `path` is its '/'-joined key in the tree."""

    path: str
    shape: tuple[int, ...]
    dtype: str


# Where a piece of a leaf goes: ints into the leading axes, then optionally a `slice` of the last axis.
Index = tuple[int | slice, ...]


def _split(index: Index) -> tuple[tuple[int, ...], slice | None]:
    """(the ints into the leading axes, the trailing `slice` of the last axis or None)."""
    if index and isinstance(index[-1], slice):
        return index[:-1], index[-1]
    return index, None


def region(index: Index) -> tuple[Any, ...]:
    """`index` as a NumPy / TensorStore index: a trailing `slice` addresses the last axis."""
    ints, columns = _split(index)
    return ints if columns is None else (*ints, Ellipsis, columns)


def _region_shape(shape: tuple[int, ...], index: Index, lead_ndim: int) -> tuple[int, ...] | None:
    """The shape `index` addresses in an array of `shape`; None if it is not a piece of a slice as written."""
    ints, columns = _split(index)
    if len(ints) != lead_ndim:
        return None
    rest = shape[lead_ndim:]
    if columns is None:
        return rest
    return (*rest[:-1], len(range(*columns.indices(rest[-1]))))


@dataclasses.dataclass
class LeafWrite:
    """What the stream yields for one leaf: its path and (index, piece) pairs (see `Index`)."""

    path: str
    slices: Iterator[tuple[Index, np.ndarray]]
    lead_ndim: int = 0  # leading axes that `slices` iterates; the array is written in chunks of one such slice
    # When set, each slice comes in pieces of this many columns of its last axis (the last piece may be narrower),
    # and the array is written in chunks of one piece.
    columns: int | None = None


def whole(path: str, value: Any) -> LeafWrite:
    """A leaf written in one piece."""
    return LeafWrite(path, iter([((), np.asarray(value))]))


Stream = Callable[[], Iterator[LeafWrite]]


def save(
    directory: pathlib.Path,
    structure: Mapping[str, ShapeDtype],
    stream: Stream,
    *,
    max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
) -> None:
    """Saves `{"params": tree}` at `directory`, as `PyTreeCheckpointer().save` would, pulling leaves from `stream`.

    `structure` gives every leaf's path, shape and dtype up front; `stream()` must yield a LeafWrite for each of
    them (in any order), each consumed before the next is requested. At most `max_inflight_bytes` of written data
    wait for TensorStore at a time (plus the slice being handed over).
    """
    handler = StreamingArrayHandler(stream, max_inflight_bytes)
    registry = ocp.type_handlers.create_type_handler_registry((PendingLeaf, handler), (jax.Array, handler))
    tree = _sources.unflatten({p: PendingLeaf(p, tuple(sd.shape), sd.dtype) for p, sd in structure.items()})
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        ckptr.save(pathlib.Path(directory).resolve(), args=ocp.args.PyTreeSave({"params": tree}))


class StreamingArrayHandler(ocp.type_handlers.ArrayHandler):
    """Orbax ArrayHandler whose `serialize` writes PendingLeaf values pulled from a stream, slice by slice."""

    def __init__(self, stream: Stream, max_inflight_bytes: int = MAX_INFLIGHT_BYTES):
        super().__init__(array_metadata_store=orbax_compat.array_metadata_store())
        self._stream = stream
        self._max_inflight_bytes = max_inflight_bytes
        self._written: set[str] = set()

    def memory_size(self, values: Sequence[PendingLeaf]) -> list[tuple[int, int]]:
        sizes = [int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in values]
        return [(s, s) for s in sizes]

    async def serialize(self, values, infos, args=None):
        from orbax.checkpoint import future

        if not all(isinstance(v, PendingLeaf) for v in values):
            raise TypeError("StreamingArrayHandler only writes PendingLeaf placeholders")
        await self._write_all({v.path: (v, info) for v, info in zip(values, infos, strict=True)})
        return [future.CommitFutureAwaitingContractedSignals(asyncio.sleep(0), name="streamed_arrays")]

    async def _write_all(self, targets: dict[str, tuple[PendingLeaf, Any]]) -> None:
        import tensorstore as ts

        for _, info in targets.values():
            await orbax_compat.await_path_creation(info)
        sharding_txn = ts.Transaction()
        sharding = _single_device_sharding()
        array_metadatas = []
        inflight = _Inflight(self._max_inflight_bytes)
        try:
            for item in self._stream():
                if item.path not in targets or item.path in self._written:
                    raise RuntimeError(f"the merge stream produced an unexpected or repeated leaf {item.path}")
                leaf, info = targets[item.path]
                array_metadatas.append(await self._write_leaf(item, leaf, info, inflight))
                await self._write_sharding(info, sharding, sharding_txn)
                self._written.add(item.path)
                del item
                host_memory.release_freed()
        except BaseException:
            # No TensorStore write may land after the caller has removed the staging directory; the error being
            # raised is the first one.
            await inflight.drain(raise_first=False)
            raise
        # The writes still waiting may fail too (a full disk): every one is awaited, and the first error raised.
        await inflight.drain(raise_first=True)
        missing = sorted(set(targets) - self._written)
        if missing:
            raise RuntimeError(f"the merge stream ended without producing {len(missing)} leaves, e.g. {missing[:3]}")
        await sharding_txn.commit_async()
        await self._array_metadata_store.write(
            checkpoint_dir=next(iter(targets.values()))[1].parent_dir,
            array_metadatas=array_metadatas,
            process_index=multihost.process_index(),
        )

    async def _write_leaf(self, item: LeafWrite, leaf: PendingLeaf, info: Any, inflight: _Inflight):
        """Writes one leaf piece by piece (as ArrayHandler writes an array sharded on its leading axes, and on its
        last axis when the pieces are column pieces)."""
        import tensorstore as ts

        chunk = (1,) * item.lead_ndim + leaf.shape[item.lead_ndim :]
        if item.columns is not None:
            chunk = (*chunk[:-1], item.columns)
        spec, metadata = orbax_compat.array_write_spec(
            info,
            global_shape=leaf.shape,
            write_shape=chunk,
            dtype=np.dtype(leaf.dtype),
            metadata_key=self._metadata_key,
        )
        store = await ts.open(ts.Spec(spec), create=True, open=True, context=info.ts_context)
        for index, value in item.slices:
            host = np.asarray(value)
            want = _region_shape(leaf.shape, index, item.lead_ndim)
            if (host.shape, host.dtype) != (want, np.dtype(leaf.dtype)):
                raise RuntimeError(f"{item.path}{list(index)}: got {host.dtype}{list(host.shape)}, want {want}")
            nbytes = host.nbytes
            # As Orbax's own ArrayHandler writes: TensorStore keeps the piece itself, not a copy of it, until written
            # (pieces are never modified once handed over), so a waiting write holds the piece and its zstd output.
            write = store[region(index)].write(host, can_reference_source_data_indefinitely=True)
            del value, host
            await inflight.add(write, nbytes)
        return metadata

    async def _write_sharding(self, info: Any, serialized: str, txn: Any) -> None:
        import tensorstore as ts

        store = await ts.open(orbax_compat.sharding_spec(info), open=True, context=info.ts_context)
        await store.with_transaction(txn).write(serialized)


def _single_device_sharding() -> str:
    """Leaves are recorded as living on one host device, as a jax.Array saved from a one-device process is."""
    sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    return ocp.metadata.SingleDeviceShardingMetadata.from_jax_sharding(sharding).to_serialized_string()


class _Inflight:
    """TensorStore writes handed over but not yet finished, with a running byte count."""

    def __init__(self, max_bytes: int):
        self._max_bytes = max_bytes
        self._writes: collections.deque[tuple[Any, int]] = collections.deque()
        self._bytes = 0

    async def add(self, write: Any, nbytes: int) -> None:
        """Queues `write`, then waits for the oldest writes while more than `max_bytes` are pending."""
        self._writes.append((write, nbytes))
        self._bytes += nbytes
        while self._bytes > self._max_bytes:
            oldest, size = self._writes.popleft()
            self._bytes -= size
            await oldest

    async def drain(self, *, raise_first: bool) -> None:
        """Waits for every pending write; then raises the first one's error if `raise_first`."""
        first: Exception | None = None
        while self._writes:
            write, _ = self._writes.popleft()
            try:
                await write
            except Exception as e:
                first = first or e
        self._bytes = 0
        if raise_first and first is not None:
            raise first
