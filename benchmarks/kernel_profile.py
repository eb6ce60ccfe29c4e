"""Where the merge kernel's time goes on the largest layer slice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.device_ops import _convert
from benchmarks.inputs import MergeInputs
from benchmarks.timing import measure


def kernel_profile(inputs: MergeInputs, repeats: int) -> list[dict[str, Any]]:
    """Where the kernel's time goes on the largest layer slice: the whole kernel, then each part timed on its own."""
    import functools

    import jax
    import jax.numpy as jnp

    from openpi_merge_plugin.lora import equations as eq
    from openpi_merge_plugin.merge import slice_chunks
    from openpi_merge_plugin.merge import slice_ops as so

    a = max(inputs.adapters, key=lambda a: int(np.prod(inputs.flat[a.base_path].shape[len(a.lead_shape) :])))
    index = (0,) * len(a.lead_shape)
    host_w = inputs.flat[a.base_path][index]
    w, la, lb = (jax.device_put(inputs.flat[p][index]) for p in (a.base_path, a.a_path, a.b_path))
    eqns = eq.to_letters(a.delta.layer_equation, *a.delta.lora_equations)
    factor, key, f32 = jnp.float32(a.scale), jax.random.key(0), jnp.float32
    x = jax.random.normal(key, so._probe_shape(eqns[0], w.shape), f32)  # noqa: SLF001
    kernel = functools.partial(so.merge_slice, delta_eqn=a.delta.equation, layer_eqns=eqns)

    def merged(w, la, lb):
        return so.merge_weight(w, la, lb, a.delta.equation, factor), so.lora_delta(la, lb, a.delta.equation, factor)

    def statistics(w, la, lb):  # the kernel's one pass for ||W||, the bf16 loss and finiteness
        m, d = merged(w, la, lb)
        w32 = w.astype(f32)
        lost = m.astype(jnp.bfloat16).astype(f32) - w32 - d
        return so._row_sums(jnp.square(w32), jnp.square(lost), jnp.isfinite(m))  # noqa: SLF001

    def verification(w, la, lb, x):
        m = merged(w, la, lb)[0]
        want = so._lora_forward(x, w.astype(f32), la, lb, factor, eqns)  # noqa: SLF001
        return jnp.max(jnp.abs(so._layer_einsum(eqns[0], x, m) - want)), jnp.max(jnp.abs(want))  # noqa: SLF001

    bounds = slice_chunks.column_bounds(a.delta.layer_equation, tuple(w.shape))
    pieces = "whole" if bounds is None else f"{len(bounds)} column pieces of {bounds[0][1]} columns"

    def engine_slice(w, la, lb, x):
        run = slice_chunks.SliceMerge(
            w, la, lb, factor, key, delta_eqn=a.delta.equation, layer_eqns=eqns, out_dtype=np.dtype("float32"),
            verify=True, bounds=bounds,
        )  # fmt: skip
        return [piece for _, piece in run], run.stats

    out = [
        measure(
            lambda: engine_slice(w, la, lb, x),
            repeats,
            label=f"the engine's slice merge ({pieces}, `slice_chunks.SliceMerge`), fp32 out, verify, pieces on host",
        )
    ]
    parts: list[tuple[str, Callable[..., Any]]] = [
        (
            "whole kernel, fp32 out, verify: one `merge_slice` call on the whole slice",
            lambda w, la, lb, x: kernel(w, la, lb, factor, key, out_dtype=f32, verify=True),
        ),
        (
            "whole kernel, fp32 out, no verify",
            lambda w, la, lb, x: kernel(w, la, lb, factor, key, out_dtype=f32, verify=False),
        ),
        ("bf16 -> fp32 convert only (the floor's math)", lambda w, la, lb, x: w.astype(f32)),
        ("merge only: w + factor * einsum(a, b)", lambda w, la, lb, x: merged(w, la, lb)[0]),
        (
            "merge + statistics: ||W||, bf16 loss and finiteness in one row-wise variadic reduction",
            lambda w, la, lb, x: statistics(w, la, lb),
        ),
        (
            "stat delta_norm (Gram form, factors only)",
            lambda w, la, lb, x: so._delta_norm(  # noqa: SLF001
                a.delta.equation, la, lb, factor
            ),
        ),
        (
            "merge + verification: LoRA forward and merged probe matmuls (batched over the weight's leading axes)",
            verification,
        ),
    ]
    for label, fn in parts:
        jitted = jax.jit(fn)
        out.append(measure(lambda jitted=jitted: jitted(w, la, lb, x), repeats, label=label))
    out.append(
        measure(
            lambda: np.asarray(_convert("float32")(jax.device_put(host_w))),
            repeats,
            label="host -> device slice, astype, device -> host (the data path)",
        )
    )
    out.append({"label": "largest slice", "path": a.base_path, "shape": list(w.shape)})
    return out
