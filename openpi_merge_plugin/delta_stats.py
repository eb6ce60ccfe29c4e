"""How large one adapter's update is, layer by layer, measured with the merge kernel without writing anything.

Per layer slice: ||dW|| / ||W||, and the fraction of ||dW|| that survives storing W + dW in bfloat16. The same
numbers a merge records in its manifest, since both come from `slice_ops.merge_slice`.
"""

from __future__ import annotations

from collections.abc import Callable
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openpi_merge_plugin import adapters as _adapters
from openpi_merge_plugin import equations as eq
from openpi_merge_plugin import slice_ops
from openpi_merge_plugin import sources as _sources
from openpi_merge_plugin.report import WeightReport

logger = logging.getLogger("openpi_merge_plugin")

ProgressFn = Callable[[str, int], None]  # (adapter path, layer slices done in this call)


def measure(
    source: _sources.ParamSource, adapter: _adapters.Adapter, progress: ProgressFn | None = None
) -> WeightReport:
    """Reads this adapter's three arrays (and nothing else) and returns its per-layer statistics."""
    arrays = source.read([adapter.base_path, adapter.a_path, adapter.b_path])
    w, a, b = arrays[adapter.base_path], arrays[adapter.a_path], arrays[adapter.b_path]
    del arrays
    base_dtype = np.dtype(w.dtype).name
    report = WeightReport(
        path=adapter.base_path,
        module=adapter.module,
        expert=adapter.expert,
        kind=adapter.kind,
        rank=adapter.rank,
        alpha=adapter.spec.alpha,
        rslora=adapter.spec.rslora,
        scale=adapter.scale,
        strength=1.0,
        shape=tuple(w.shape),
        input_dtype=base_dtype,
        output_dtype=base_dtype,
    )
    layer_eqns = eq.to_letters(adapter.delta.layer_equation, *adapter.delta.lora_equations)
    factor = jnp.float32(adapter.scale)
    key = jax.random.key(0)  # unused without verification, but part of the kernel's signature
    n_lead = len(adapter.lead_shape)
    finite = True
    for index in np.ndindex(*adapter.lead_shape):
        _, stats = slice_ops.merge_slice(
            _slice(w, index, n_lead),
            _slice(a, index, n_lead),
            _slice(b, index, n_lead),
            factor,
            key,
            delta_eqn=adapter.delta.equation,
            layer_eqns=layer_eqns,
            out_dtype=np.dtype(np.float32),  # as engine passes it, so merges and inspections share kernels
            verify=False,
        )
        stats = {k: float(v) for k, v in stats.items()}
        finite = finite and bool(stats["adapters_finite"])
        report.add_slice(stats)
        if progress is not None:
            progress(adapter.base_path, 1)
    if not finite:
        logger.warning("adapter %s / %s holds NaN or Inf values", adapter.a_path, adapter.b_path)
    return report


def _slice(x: Any, index: tuple[int, ...], n_lead: int) -> Any:
    return x[index] if n_lead else x
