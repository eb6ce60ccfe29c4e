"""Reads a params checkpoint the way openpi does and prints a digest of every leaf, as JSON (for test_stacks.py).

    python stack_reader.py PARAMS_DIR

Runs in whichever interpreter (and so whichever jax / orbax-checkpoint) it is started with, and imports nothing of
this package: the reader must be the one a user of that stack has. With openpi importable it reads through
`openpi.models.model.restore_params`, as `serve_policy.py` loads a checkpoint; otherwise through the same Orbax calls
(`PyTreeCheckpointer.metadata`, then `restore` as `jax.Array` replicated on every device), where the metadata is
taken from whichever form this Orbax returns it in (the tree itself in 0.11.13, `StepMetadata.item_metadata` in later
releases, 0.11.30 at the latest).

Not a bare `PyTreeCheckpointer().restore(dir)`: that restores onto the device the writer recorded, named as the
writer's JAX names it (`TFRT_CPU_0` before JAX 0.10, `cpu:0` from then on), which an older JAX cannot find. That is
so for Orbax's own checkpoints too; openpi always restores with a sharding of its own, as here.
"""

import hashlib
import json
import os
import pathlib
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _flat(tree, prefix=()):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def _strip_value(flat):
    if flat and all(k[-1] == "value" for k in flat):
        return {k[:-1]: v for k, v in flat.items()}
    return flat


def _orbax_restore_params(params_dir: pathlib.Path):
    """What openpi's restore_params does (15a9616), for a stack without openpi."""
    import jax
    import orbax.checkpoint as ocp

    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(jax.devices(), ("x",)), jax.sharding.PartitionSpec())
    with ocp.PyTreeCheckpointer() as ckptr:
        metadata = ckptr.metadata(params_dir)
        metadata = getattr(metadata, "item_metadata", metadata)
        item = {"params": metadata["params"]}
        restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=sharding, restore_type=jax.Array), item)
        params = ckptr.restore(params_dir, ocp.args.PyTreeRestore(item=item, restore_args=restore_args))["params"]
    return {"/".join(k): v for k, v in _strip_value(_flat(params)).items()}


def _digest(x) -> list:
    import numpy as np

    host = np.ascontiguousarray(np.asarray(x))
    return [np.dtype(host.dtype).name, list(host.shape), hashlib.sha256(host.tobytes()).hexdigest()]


def read(params_dir) -> dict:
    """{"reader": how it was read, "versions": ..., "leaves": {path: [dtype, shape, sha256 of the bytes]}}."""
    from importlib import metadata as md

    params_dir = pathlib.Path(params_dir).resolve()
    try:
        from openpi.models import model as openpi_model
    except ImportError:
        openpi_model = None
    if openpi_model is not None:
        reader = "openpi.models.model.restore_params"
        params = {"/".join(k): v for k, v in _flat(openpi_model.restore_params(params_dir)).items()}
    else:
        reader = "orbax PyTreeCheckpointer.restore (restore_params semantics)"
        params = _orbax_restore_params(params_dir)
    leaves = {p: _digest(v) for p, v in sorted(params.items())}
    versions = {n: md.version(n) for n in ("jax", "orbax-checkpoint", "numpy", "tensorstore")}
    return {"reader": reader, "versions": versions, "leaves": leaves}


if __name__ == "__main__":
    json.dump(read(sys.argv[1]), sys.stdout)
