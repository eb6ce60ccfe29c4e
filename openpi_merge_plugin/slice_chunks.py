"""One layer slice merged in column chunks, so the kernel's working memory is bounded by a chunk, not by a slice.

A full-size gemma_2b gating slice is 256 MiB in float32 and the kernel holds about three float32 copies of what it
merges (base, delta, merged); merged whole, that is ~0.8 GiB of extra device memory for one slice. Split along the
weight's last axis, which every openpi LoRA layer keeps in its output (q/kv: head dim, attn_vec/linear: width,
gating: mlp width), the chunks are independent: each takes the matching columns of the adapter that carries that
axis, the same probe checks its columns, and the slice's statistics combine exactly (sums of squares add, maxima
and finiteness combine), so the result is the slice's whole. Chunks go back into one host slice for the writer.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from openpi_merge_plugin import equations as eq
from openpi_merge_plugin import slice_ops

# float32 bytes of the weight one kernel call merges, at most (when the slice can be split), per JAX platform.
# CPU: measured fastest on the pi0-size benchmark (`scripts/benchmark.py`): chunks this small keep XLA's buffers in
# reused heap memory and in cache (1.5x faster than whole slices), while per-call overhead starts to show below
# 4 MiB. Accelerators: a bound on extra device memory, few enough launches per slice to cost nothing.
KERNEL_CHUNK_BYTES = {"cpu": 8 << 20}
DEFAULT_CHUNK_BYTES = 64 << 20


def chunk_bounds(
    layer_eqn: str, slice_shape: tuple[int, ...], max_bytes: int | None = None
) -> list[tuple[int, int]] | None:
    """Column ranges along the slice's last axis, each at most `max_bytes` of float32; None: merge it whole.

    A slice is split only along an axis the layer keeps in its output without contracting it, so that each output
    column depends on its own weight columns alone.
    """
    max_bytes = KERNEL_CHUNK_BYTES.get(jax.default_backend(), DEFAULT_CHUNK_BYTES) if max_bytes is None else max_bytes
    x_labels, w_labels, out = eq.split_equation(layer_eqn)
    size, last = math.prod(slice_shape) * 4, slice_shape[-1] if slice_shape else 1
    if size <= max_bytes or last < 2 or w_labels[-1] in x_labels or w_labels[-1] not in out:
        return None
    width = max(1, math.ceil(last / math.ceil(size / max_bytes)))
    return [(start, min(start + width, last)) for start in range(0, last, width)]


def merge(
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
    out: np.ndarray | None = None,
) -> tuple[Any, dict[str, float]]:
    """`slice_ops.merge_slice` of one layer slice, chunk by chunk where it is large: (merged slice, statistics).

    The merged slice is the kernel's device array when merged whole, else a host array: `out` when given (a
    writable host array of the slice's shape and `out_dtype`, filled chunk by chunk), else a new one. Sharded slices (FSDP
    training params) are merged whole: XLA keeps their per-device working set at a shard's share already.
    """
    kernel_args = {"delta_eqn": delta_eqn, "layer_eqns": layer_eqns, "out_dtype": out_dtype, "verify": verify}
    bounds = None if _is_sharded(w) else chunk_bounds(layer_eqns[0], tuple(w.shape))
    if bounds is None:
        merged, stats = slice_ops.merge_slice(w, a, b, factor, key, **kernel_args)
        return merged, _finish([stats])
    a_labels, b_labels, delta_out = eq.split_equation(delta_eqn)
    column = delta_out[-1]
    out = np.empty(tuple(w.shape), out_dtype) if out is None else out
    parts, pending = [], None
    for start, stop in bounds:
        chunk = slice_ops.merge_slice(
            w[..., start:stop],
            _columns(a, a_labels, column, start, stop),
            _columns(b, b_labels, column, start, stop),
            factor,
            key,  # the same probe for every chunk: each checks its own output columns of one probe pass
            **kernel_args,
        )
        if pending is not None:  # copy the previous chunk out while this one computes
            parts.append(_store(out, *pending))
        pending = (chunk, (..., slice(start, stop)))
    parts.append(_store(out, *pending))
    return out, _finish(parts)


def _store(out: np.ndarray, chunk: tuple[jax.Array, dict[str, jax.Array]], where: tuple[Any, slice]):
    merged, stats = chunk
    out[where] = np.asarray(merged)
    return stats


def _columns(x: Any, labels: str, column: str, start: int, stop: int) -> Any:
    if column not in labels:
        return x
    index = [slice(None)] * len(labels)
    index[labels.index(column)] = slice(start, stop)
    return x[tuple(index)]


def _is_sharded(x: Any) -> bool:
    return isinstance(x, jax.Array) and len(x.sharding.device_set) > 1


def _finish(parts: list[dict[str, jax.Array]]) -> dict[str, float]:
    """The slice's statistics from its chunks' (`merge_slice` keys; `rel_err*` from the combined maxima)."""
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
