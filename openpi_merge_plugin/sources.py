"""Where params are read from: an in-memory tree, or an Orbax params item read one weight at a time."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import pathlib
import re
from typing import Any, Protocol

import jax
import numpy as np

from openpi_merge_plugin.adapters import ShapeDtype
from openpi_merge_plugin.errors import CheckpointError


class ParamSource(Protocol):
    """Flat '/'-joined paths to arrays; `tree` gives shapes without reading."""

    tree: dict[str, ShapeDtype]

    def read(self, paths: Iterable[str]) -> dict[str, Any]: ...

    def sharding(self, path: str) -> jax.sharding.Sharding | None:
        """Where the leaf lives when it is a jax.Array (merged weights go back there), else None."""
        ...


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
        try:
            with ocp.PyTreeCheckpointer() as ckptr:
                metadata = ckptr.metadata(params_dir)
            root = metadata["params"]
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
