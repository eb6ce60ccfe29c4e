"""The host copy of the params that an async merge on save works from, and whether this host can hold one.

The next train step donates the params' device buffers, so a merge that outlives `save` needs its own copy of them.
It is taken as Orbax takes the copy it writes openpi's `params` item from: every device-to-host transfer started at
once, then awaited (`jax.device_get`). On a CPU backend the copy is the device buffers themselves (read-only NumPy
views); JAX does not donate a buffer that is still viewed, so the next train step allocates new ones: the memory
cost is the same as a copy there too.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from openpi_merge_plugin import options as _options

logger = logging.getLogger("openpi_merge_plugin")

# Host memory the merge needs besides the copy: the engine's slices and the write buffer (docs/benchmark.md §4:
# 0.6 GiB at full layer sizes), rounded up.
MERGE_OVERHEAD_BYTES = 1 << 30


def take(params: Any) -> dict[str, Any]:
    """openpi's `params` (an nnx.State or a nested dict of jax.Arrays) as a nested dict of host NumPy arrays."""
    import jax

    from openpi_merge_plugin.checkpoint import sources

    return jax.device_get(sources.pure_dict(params))


def nbytes(tree: Any) -> int:
    import jax

    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def params_bytes(config: Any) -> int:
    """Bytes of the params openpi saves for `config`, from shapes alone: the model's state, the weights its freeze
    filter selects in bfloat16 (as openpi's train.py stores them)."""
    from flax import nnx
    import jax

    state = jax.eval_shape(lambda rng: nnx.state(config.model.create(rng)), jax.random.key(0))
    frozen = state.filter(config.freeze_filter)
    frozen_floats = [x for x in jax.tree.leaves(frozen) if np.issubdtype(np.dtype(x.dtype), np.floating)]
    return nbytes(state) - sum(int(np.prod(x.shape)) * (np.dtype(x.dtype).itemsize - 2) for x in frozen_floats)


def available_bytes() -> int | None:
    """Memory the kernel could give this process now (Linux `MemAvailable`); None where it is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(copy_bytes: int, available: int | None) -> None:
    """Refuses async mode on a host that cannot hold the copy and the merge beside it."""
    if available is None:
        return
    needed = copy_bytes + MERGE_OVERHEAD_BYTES
    if needed > available:
        raise _options.OptionError(
            "merge_lora.mode",
            f"async keeps a host copy of the params while it merges in the background: {_gb(copy_bytes)} plus "
            f"{_gb(MERGE_OVERHEAD_BYTES)} for the merge, more than the {_gb(available)} this host has available; "
            "use --merge-lora.mode blocking (the merge streams from the live params before each save returns, in "
            "about 0.6 GiB of host memory)",
        )


def check_run(config: Any) -> None:
    """`check_fits` for a run's TrainConfig, before its model is built; skipped (logged) if openpi's model cannot be
    sized from its config."""
    try:
        copy_bytes = params_bytes(config)
    except Exception as e:  # a model this check does not know how to size: nothing is refused
        logger.debug("openpi-merge-plugin: host memory of the async merge not checked: %s", e)
        return
    available = available_bytes()
    logger.info(
        "openpi-merge-plugin: merge on save (async) holds a host copy of the params while it merges: %s (%s "
        "available now)",
        _gb(copy_bytes),
        "?" if available is None else _gb(available),
    )
    check_fits(copy_bytes, available)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"
