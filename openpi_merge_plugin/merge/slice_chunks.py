"""One layer slice merged in column pieces, so neither the kernel nor the writer ever holds a whole large slice.

A full-size gemma_2b gating slice is 256 MiB in float32. Merged whole, the kernel holds about three float32 copies
of it (base, delta, merged), and the writer then holds the slice, TensorStore's copy and its zstd output. Split
along the weight's last axis, which every openpi LoRA layer keeps in its output without contracting it (q/kv:
head dim, attn_vec/linear: width, gating: mlp width), the pieces are independent: each takes the matching columns
of the adapter that carries that axis, the same probe checks its own output columns, and the slice's statistics
combine exactly (sums of squares add; maxima and finiteness combine). Each piece goes to the writer as it comes,
written as its own chunk (`orbax_stream`), or into its place in a whole array (`engine.MergedWeight.materialize`).
"""

from __future__ import annotations

from collections.abc import Iterator
import math
from typing import Any

import jax
import numpy as np

from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.merge import slice_ops

# float32 bytes of the weight one kernel call merges, at most (when the slice can be split), per JAX platform.
# CPU: the fastest setting measured on the pi0-size benchmark (`scripts/benchmark.py`): XLA's buffers this small
# are reused heap memory and stay in cache (1.5x faster than whole slices); per-call overhead shows below 4 MiB.
# Accelerators: a bound on extra device memory, with few enough launches per slice to cost nothing.
KERNEL_CHUNK_BYTES = {"cpu": 8 << 20}
DEFAULT_CHUNK_BYTES = 64 << 20


def column_bounds(
    layer_eqn: str,
    slice_shape: tuple[int, ...],
    sharding: jax.sharding.Sharding | None = None,
    max_bytes: int | None = None,
) -> list[tuple[int, int]] | None:
    """Column ranges along the slice's last axis, each at most `max_bytes` of float32; None: merge it whole.

    A slice is split only along an axis the layer keeps in its output without contracting it, so that each output
    column depends on its own weight columns alone. Sharded weights (FSDP training params) are merged whole: XLA
    already keeps each device's share of the work to its shard.
    """
    if sharding is not None and len(sharding.device_set) > 1:
        return None
    max_bytes = KERNEL_CHUNK_BYTES.get(jax.default_backend(), DEFAULT_CHUNK_BYTES) if max_bytes is None else max_bytes
    x_labels, w_labels, out = eq.split_equation(layer_eqn)
    size, last = math.prod(slice_shape) * 4, slice_shape[-1] if slice_shape else 1
    if size <= max_bytes or last < 2 or w_labels[-1] in x_labels or w_labels[-1] not in out:
        return None
    width = math.ceil(last / math.ceil(size / max_bytes))
    return [(start, min(start + width, last)) for start in range(0, last, width)]


class SliceMerge:
    """`slice_ops.merge_slice` of one layer slice, in the given column pieces (None: whole).

    Iterating yields (columns, merged piece as a host array), `columns` a `slice` of the last axis or None for the
    whole slice; afterwards `stats` holds the slice's statistics (`merge_slice`'s, with `rel_err` and
    `rel_err_stored` formed from the combined maxima). The next piece is computing while one is handed out.
    """

    def __init__(
        self,
        w: Any,
        a: Any,
        b: Any,
        factor: jax.Array,
        key: jax.Array,
        *,
        delta_eqn: str,
        layer_eqns: tuple[str, str, str],
        out_dtype: np.dtype,
        verify: bool,
        bounds: list[tuple[int, int]] | None,
    ):
        self._args = (w, a, b, factor, key)
        self._kernel = {"delta_eqn": delta_eqn, "layer_eqns": layer_eqns, "out_dtype": out_dtype, "verify": verify}
        self._bounds = bounds
        self.stats: dict[str, float] | None = None

    def __iter__(self) -> Iterator[tuple[slice | None, np.ndarray]]:
        w, a, b, factor, key = self._args
        if self._bounds is None:
            merged, stats = slice_ops.merge_slice(w, a, b, factor, key, **self._kernel)
            self.stats = _combine([stats])
            yield None, np.asarray(merged)
            return
        a_labels, b_labels, delta_out = eq.split_equation(self._kernel["delta_eqn"])
        column = delta_out[-1]  # the delta's axes are the weight's, in order
        parts, pending = [], None
        for start, stop in self._bounds:
            cols = slice(start, stop)
            # The same probe (key) for every piece: each checks its own output columns of one probe pass.
            result = slice_ops.merge_slice(
                w[..., cols], _columns(a, a_labels, column, cols), _columns(b, b_labels, column, cols), factor, key,
                **self._kernel,
            )  # fmt: skip
            if pending is not None:
                yield pending[0], np.asarray(pending[1])
            pending = (cols, result[0])
            parts.append(result[1])
        self.stats = _combine(parts)
        yield pending[0], np.asarray(pending[1])


def _columns(x: Any, labels: str, column: str, cols: slice) -> Any:
    if column not in labels:
        return x
    index = [slice(None)] * len(labels)
    index[labels.index(column)] = cols
    return x[tuple(index)]


def _combine(parts: list[dict[str, jax.Array]]) -> dict[str, float]:
    """A slice's statistics from its pieces' (norms as root sum of squares, flags all, maxima max)."""
    values = [{k: float(v) for k, v in p.items()} for p in parts]
    stats: dict[str, float] = {}
    for key in values[0]:
        column = [v[key] for v in values]
        if key.endswith("_norm"):
            stats[key] = math.sqrt(sum(x * x for x in column))
        elif key.endswith("_finite"):
            stats[key] = float(all(column))
        else:  # err_max, err_stored_max, want_max; NaN (a non-finite merge) wins, as in one whole-slice max
            stats[key] = math.nan if any(math.isnan(x) for x in column) else max(column)
    if "want_max" in stats:
        want = max(stats.pop("want_max"), float(np.finfo(np.float32).tiny))
        stats["rel_err"] = stats.pop("err_max") / want
        stats["rel_err_stored"] = stats.pop("err_stored_max") / want
    return stats
