"""Where params are read from: an in-memory tree, or an Orbax params item read a weight (or a layer slice) at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
import functools
import logging
import pathlib
import re
from typing import Any, Protocol

import jax
import numpy as np

from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import zarr_stream
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.options import shown

logger = logging.getLogger("openpi_merge_plugin")


class ParamSource(Protocol):
    """Flat '/'-joined paths to arrays; `tree` gives shapes without reading."""

    tree: dict[str, ShapeDtype]

    def read(self, paths: Iterable[str]) -> dict[str, Any]: ...

    def sliced(self, path: str) -> Any:
        """The leaf as an array, or as a `SlicedArray` that reads `[index]` (ints into leading axes) on demand."""
        ...

    def sharding(self, path: str) -> jax.sharding.Sharding | None:
        """Where the leaf lives when it is a jax.Array (merged weights go back there), else None."""
        ...


def pure_dict(params: Any) -> Any:
    """openpi's params (an nnx.State, or already nested dicts) as nested dicts of their arrays."""
    if not hasattr(params, "to_pure_dict"):
        return params
    # flax >= 0.11 has nnx.to_pure_dict (State.to_pure_dict is deprecated there); openpi's flax 0.10.2 has the method.
    from flax import nnx

    to_pure_dict = getattr(nnx, "to_pure_dict", None)
    return to_pure_dict(params) if to_pure_dict is not None else params.to_pure_dict()


def flatten(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict -> {'a/b/c': leaf}. Drops the trailing 'value' that nnx.State leaves add, as openpi does."""
    flat = {"/".join(map(str, k)): v for k, v in flatten_keys(params).items()}
    if flat and all(p.endswith("/value") for p in flat):
        flat = {p[: -len("/value")]: v for p, v in flat.items()}
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def shape_dtype(x: Any) -> ShapeDtype:
    return ShapeDtype(tuple(int(d) for d in x.shape), np.dtype(x.dtype).name)


class InMemorySource:
    def __init__(self, params: Mapping[str, Any]):
        self.arrays = flatten(params)
        self.tree = {p: shape_dtype(v) for p, v in self.arrays.items()}

    def read(self, paths: Iterable[str]) -> dict[str, Any]:
        return {p: self.arrays[p] for p in paths}

    def sliced(self, path: str) -> Any:
        return self.arrays[path]

    def sharding(self, path: str) -> jax.sharding.Sharding | None:
        leaf = self.arrays[path]
        return leaf.sharding if isinstance(leaf, jax.Array) else None


class OrbaxSource:
    """An openpi `params` item (`{"params": tree}`, leaves maybe ending in `value`), read lazily."""

    def __init__(self, params_dir: pathlib.Path):
        import orbax.checkpoint as ocp

        self.params_dir = pathlib.Path(params_dir).resolve()
        params_dir = self.params_dir
        self._ocp = ocp
        check_utf8(params_dir)
        try:
            root = orbax_compat.tree_metadata(params_dir)["params"]
        except Exception as e:  # orbax raises many types for a directory that is not a checkpoint
            if (params_dir / "_METADATA").is_file() or (params_dir / "manifest.ocdbt").is_file():
                raise CheckpointError(
                    f"{params_dir} is an Orbax checkpoint but cannot be read (truncated or corrupted?): {_short(e)}"
                ) from e
            raise CheckpointError(
                f"{params_dir} is not an Orbax params checkpoint readable by openpi: {_short(e)}"
            ) from e
        leaves = flatten_keys(root)
        self._value_suffix = bool(leaves) and all(k[-1] == "value" for k in leaves)
        self._keys = {"/".join(k[:-1] if self._value_suffix else k): k for k in leaves}
        self._metadata = {p: leaves[k] for p, k in self._keys.items()}
        self.tree = {p: ShapeDtype(tuple(m.shape), np.dtype(m.dtype).name) for p, m in self._metadata.items()}

    def sharding(self, path: str) -> None:
        return None

    def sliced(self, path: str) -> SlicedArray | np.ndarray:
        """The leaf, read slice by slice (`SlicedArray`); read whole, as `read` does, if TensorStore cannot open it
        directly (a layout this module does not know: the whole read then works, or raises its usual error)."""
        try:
            array = SlicedArray.open(self.params_dir, ("params", *self._keys[path]), path, self._ocdbt_index)
        except Exception as e:
            logger.debug("reading %s whole: %s", path, _short(e))
            return self.read([path])[path]
        if (array.shape, array.dtype.name) != (tuple(self.tree[path].shape), self.tree[path].dtype):
            raise CheckpointError(
                f"{self.params_dir}: {path} is stored as {array.dtype}{list(array.shape)}, its metadata says "
                f"{self.tree[path].dtype}{list(self.tree[path].shape)} (corrupted checkpoint?)"
            )
        return array

    @functools.cached_property
    def _ocdbt_index(self) -> zarr_stream.OcdbtIndex | None:
        """Where the checkpoint's chunks are, for the arrays read streamed (None: all read through TensorStore)."""
        try:
            return zarr_stream.OcdbtIndex.load(self.params_dir)
        except Exception as e:
            logger.debug("%s: chunks read through TensorStore only: %s", self.params_dir, _short(e))
            return None

    def read(self, paths: Iterable[str]) -> dict[str, np.ndarray]:
        paths = list(paths)
        item: dict[str, Any] = {}
        for p in paths:
            node = item
            *parents, leaf = ("params", *self._keys[p])
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = self._metadata[p]
        restore_args = jax.tree.map(lambda _: self._ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with self._ocp.PyTreeCheckpointer() as ckptr:
                restored = ckptr.restore(
                    self.params_dir,
                    self._ocp.args.PyTreeRestore(item=item, restore_args=restore_args, transforms={}),
                )
        except Exception as e:
            what = paths[0] if len(paths) == 1 else f"{len(paths)} arrays ({paths[0]}, ...)"
            raise CheckpointError(
                f"cannot read {self.params_dir} (truncated or corrupted checkpoint?): {what}: {_short(e)}"
            ) from e
        out = {}
        for p in paths:
            node = restored["params"]
            for part in self._keys[p]:
                node = node[part]
            out[p] = node
        return out


def check_utf8(path: pathlib.Path) -> None:
    """A checkpoint's path must be UTF-8: TensorStore opens it by a UTF-8 path (another encoding's name: an error)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(
            f"checkpoint {shown(path)}: the path is not UTF-8, and TensorStore opens checkpoints by UTF-8 paths only: "
            "rename the directory (or link to it from a UTF-8 path)"
        ) from None


class SlicedArray:
    """An array of an Orbax (OCDBT) checkpoint, read one slice at a time: `x[index]` reads `index` (ints into its
    leading axes, or a range of its first axis; `()` for all of it).

    A large array in a layout `zarr_stream` knows is read by stream-decoding its chunks (memory: the slice read);
    any other through TensorStore, with the spec Orbax reads it with, where a chunk, once decoded, stays cached while
    this object lives (decoded once for all its layer slices).
    """

    def __init__(
        self,
        read: Callable[[Any], np.ndarray],
        shape: tuple[int, ...],
        dtype: Any,
        params_dir: pathlib.Path,
        path: str,
        *,
        streamed: bool = False,  # `read` stream-decodes (zarr_stream), rather than reading through TensorStore
    ):
        self._read = read
        self._params_dir = params_dir
        self.path = path
        self.shape = tuple(int(d) for d in shape)
        self.dtype = np.dtype(dtype)
        self.streamed = streamed

    @classmethod
    def open(
        cls, params_dir: pathlib.Path, keys: tuple[str, ...], path: str, index: zarr_stream.OcdbtIndex | None = None
    ) -> SlicedArray:
        import json

        import tensorstore as ts

        if not (params_dir / "manifest.ocdbt").is_file():
            raise ValueError("not an OCDBT checkpoint")
        tree_metadata = json.loads((params_dir / "_METADATA").read_text())
        context = orbax_compat.ts_context()
        spec = orbax_compat.array_read_spec(
            params_dir,
            ".".join(keys),
            use_zarr3=tree_metadata.get("use_zarr3", False),
            # As Orbax reads: a chunk that is not there is an error, unless chunks equal to the fill value were not
            # written.
            missing_is_error=tree_metadata.get("store_array_data_equal_to_fill_value", False),
            context=context,
        )
        if index is not None and spec["driver"] == "zarr" and spec["kvstore"]["driver"] == "ocdbt":
            streamed = zarr_stream.open_streamed(index, spec["kvstore"]["path"], path)
            if streamed is not None:
                return cls(streamed.__getitem__, streamed.shape, streamed.dtype, params_dir, path, streamed=True)
        probe = ts.open(ts.Spec(spec), open=True, read=True, context=context).result()
        # A cache of this store's own (freed with it), with room for the decoded chunks that hold one index of the
        # first axis (a layer), so that each is decoded once; TensorStore keeps no entry as large as the whole pool,
        # hence twice that (a limit: only what is read is held).
        chunk, shape = probe.chunk_layout.read_chunk.shape, probe.shape
        row = chunk[:1] + tuple(-(-n // c) * c for n, c in zip(shape[1:], chunk[1:], strict=True))
        row_bytes = int(np.prod(row, dtype=np.int64)) * probe.dtype.numpy_dtype.itemsize
        spec["cache_pool"] = {"total_bytes_limit": 2 * row_bytes}
        store = ts.open(ts.Spec(spec), open=True, read=True, context=context).result()
        return cls(lambda i: store[i].read().result(), store.shape, store.dtype.numpy_dtype, params_dir, path)

    def __getitem__(self, index: Any) -> np.ndarray:
        try:
            return self._read(index)
        except IndexError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"cannot read {self._params_dir} (truncated or corrupted checkpoint?): {self.path}: {_short(e)}"
            ) from e


def _short(e: Exception) -> str:
    """The error's text without the TensorStore spec and source locations it appends (hundreds of characters)."""
    return re.sub(r" \[(tensorstore_spec|source locations)='.*?'\]", "", str(e), flags=re.DOTALL).strip()


def flatten_keys(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


class AdapterArrays:
    """The three arrays of one adapter, ready to be walked a layer slice at a time: the merge and the verification
    read them the same way (the base weight a slice at a time where the source can, the small adapters whole)."""

    def __init__(self, source: ParamSource, adapter: Any):
        arrays = source.read([adapter.a_path, adapter.b_path])
        self.a, self.b = arrays[adapter.a_path], arrays[adapter.b_path]
        self.w = source.sliced(adapter.base_path)
        self.lead_shape: tuple[int, ...] = tuple(adapter.lead_shape)

    def slices(self) -> Iterator[tuple[int, tuple[int, ...], Any, Any, Any]]:
        """(flat index, index on the leading axes, w, a, b) of each layer slice, in order."""
        n_lead = len(self.lead_shape)
        for flat_index, index in enumerate(np.ndindex(*self.lead_shape)):
            yield flat_index, index, *(_slice(x, index, n_lead) for x in (self.w, self.a, self.b))


def _slice(x: Any, index: tuple[int, ...], n_lead: int) -> Any:
    if n_lead or isinstance(x, SlicedArray):  # a SlicedArray reads [()] whole
        return x[index]
    return x
