"""The naive merge: every full delta materialised on the device at once."""

from __future__ import annotations

import numpy as np

from benchmarks.device_ops import _add
from benchmarks.device_ops import _full_delta
from benchmarks.inputs import MergeInputs


def naive_merge(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """The naive merge: the whole tree on the device, every full delta materialised at once, then added (no checks)."""
    import jax

    device = {p: jax.device_put(x) for p, x in inputs.flat.items()}
    deltas = {
        a.base_path: _full_delta(device[a.a_path], device[a.b_path], a.delta.equation, len(a.lead_shape), a.scale)
        for a in inputs.adapters
    }
    jax.block_until_ready(deltas)
    return {p: np.asarray(_add(device[p], d, out_dtype)) for p, d in deltas.items()}
