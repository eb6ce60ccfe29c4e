"""Writing a params item in the layout openpi's `restore_params` reads (as in openpi's released checkpoints)."""

from __future__ import annotations

from collections.abc import MutableMapping
import pathlib
from typing import Any

import jax
import numpy as np

from openpi_merge_plugin.checkpoint import sources as _sources


def save_params(params_dir: pathlib.Path, flat: MutableMapping[str, Any]) -> None:
    """Saves `{"params": tree}` with Orbax's PyTreeCheckpointer, as openpi's released `params` checkpoints are.

    Consumes `flat`: each host array is released as soon as its jax.Array copy exists, so at most one leaf is held
    twice.
    """
    import orbax.checkpoint as ocp

    cpu = jax.devices("cpu")[0]
    converted = {}
    for path in list(flat):
        converted[path] = _as_jax(flat.pop(path), cpu)
    tree = _sources.unflatten(converted)
    del converted
    with ocp.PyTreeCheckpointer() as ckptr:
        # `args=` (rather than the bare item, which later Orbax releases deprecate) works on every supported version.
        ckptr.save(pathlib.Path(params_dir).resolve(), args=ocp.args.PyTreeSave({"params": tree}))


def _as_jax(x: Any, device: jax.Device) -> jax.Array:
    # openpi writes jax.Arrays; saving the same type keeps the on-disk metadata identical.
    if isinstance(x, jax.Array):
        return x
    return jax.device_put(np.asarray(x), device)
