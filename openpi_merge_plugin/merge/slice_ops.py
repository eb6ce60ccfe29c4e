"""The merge (`merge_weight`) and its per-layer-slice device kernels: merge one slice with its statistics, or check a
stored merged slice, against openpi's LoRA forward.

Everything is float32 on the JAX default device. One jit per (adapter shape, equation). The engine calls
`merge_slice` on a slice or on a column piece of one (`slice_chunks`), so the device holds one piece at a time.
"""

from __future__ import annotations

import functools
import string
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from openpi_merge_plugin.lora import equations as eq

_PROBE_BATCH = 2  # size of every input label the weight does not have (batch, tokens)
# float32 all the way: without this, GPUs run float32 matmuls in TF32 and lose ~3 digits.
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)


def _probe_shape(layer_eqn: str, w_shape: tuple[int, ...]) -> tuple[int, ...]:
    x_labels, w_labels, _ = eq.split_equation(layer_eqn)
    sizes = dict(zip(w_labels, w_shape, strict=True))
    return tuple(sizes.get(c, _PROBE_BATCH + i) for i, c in enumerate(x_labels))


def _rel_err(got: jax.Array, want: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), jnp.finfo(jnp.float32).tiny)


def _layer_einsum(eqn: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """`einsum(eqn, x, w)` for a probe x, with the weight's leading output-only axes made batch axes of the dot.

    Same result; the reason is speed on CPU: for `BTD,GDF->GBTF` XLA transposes the whole [G, D, F] weight before
    the dot (seconds for a full-size gating slice), and slicing it per G copies each slice; with x broadcast over G,
    `GBTD,GDF->GBTF` is a batched matmul that reads the weight in place, at memory speed.
    """
    x_labels, w_labels, out = eq.split_equation(eqn)
    lead = len(w_labels) - len(w_labels.lstrip("".join(c for c in w_labels if c in out and c not in x_labels)))
    if lead == 0:
        return _einsum(eqn, x, w)
    x = jnp.broadcast_to(x, w.shape[:lead] + x.shape)
    return _einsum(f"{w_labels[:lead]}{x_labels},{w_labels}->{out}", x, w)


def _row_sums(*terms: jax.Array) -> list[jax.Array]:
    """Whole-slice sums (float terms) and alls (bool terms) of same-shaped elementwise terms, in one pass.

    One variadic reduce over the last axis, then over the small per-row results: on XLA's CPU backend that is ~5x
    faster than a separate reduction per term (each a pass that does not vectorise), and summing rows first keeps
    float32 accuracy at ~1e-6 where one running sum over 67M elements drifts by ~1%. Reducing the last axis keeps a
    sharded slice sharded: no gather, only the per-row results are combined.
    """
    inits = tuple(jnp.ones((), t.dtype) if t.dtype == jnp.bool_ else jnp.zeros((), t.dtype) for t in terms)

    def combine(x: tuple[jax.Array, ...], y: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
        return tuple(p & q if p.dtype == jnp.bool_ else p + q for p, q in zip(x, y, strict=True))

    rows = jax.lax.reduce(terms, inits, combine, (terms[0].ndim - 1,))
    return [jnp.all(r) if r.dtype == jnp.bool_ else jnp.sum(r) for r in rows]


def _delta_norm(delta_eqn: str, a32: jax.Array, b32: jax.Array, factor: jax.Array) -> jax.Array:
    """||factor * einsum(delta_eqn, a, b)|| from the small factors alone (Gram form), without a pass over the delta.

    ||sum_c f(o, c)||^2 = sum_o sum_c sum_c' f(o, c) f(o, c'): two copies of the product with every summed label
    renamed in the second one.
    """
    a_labels, b_labels, out = eq.split_equation(delta_eqn)
    summed = sorted(set(a_labels + b_labels) - set(out))
    fresh = [c for c in string.ascii_letters if c not in delta_eqn][: len(summed)]
    rename = str.maketrans("".join(summed), "".join(fresh))
    gram = jnp.einsum(
        f"{a_labels},{b_labels},{a_labels.translate(rename)},{b_labels.translate(rename)}->",
        a32,
        b32,
        a32,
        b32,
        optimize="optimal",
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sqrt(jnp.maximum(gram, 0.0)) * jnp.abs(factor)


def lora_delta(a: jax.Array, b: jax.Array, equation: str, factor: jax.Array) -> jax.Array:
    """openpi's LoRA update of one weight: `factor * einsum(equation, a, b)`, float32 (`equations` derives the
    equation from openpi's two LoRA einsums; `factor` is openpi's scaling times the strength)."""
    return _einsum(equation, a.astype(jnp.float32), b.astype(jnp.float32)) * factor


def merge_weight(w: jax.Array, a: jax.Array, b: jax.Array, equation: str, factor: jax.Array) -> jax.Array:
    """The whole merge, in float32: `W' = W + factor * einsum(equation, A, B)`."""
    return w.astype(jnp.float32) + lora_delta(a, b, equation, factor)


def _lora_forward(
    x: jax.Array, w32: jax.Array, a32: jax.Array, b32: jax.Array, factor: jax.Array, layer_eqns: tuple[str, str, str]
) -> jax.Array:
    """openpi's LoRA forward of x: base einsum + scaled two-step LoRA einsum, all float32."""
    eqn, eqn_a, eqn_b = layer_eqns
    return _layer_einsum(eqn, x, w32) + _einsum(eqn_b, _einsum(eqn_a, x, a32), b32) * factor


def probe_seed(seed: int, path: str, flat_index: int) -> tuple[int, int, int]:
    """The one recipe for the probes of a weight's layer slice: reproducible per (seed, weight path, slice)."""
    return seed, zlib.crc32(path.encode()) % (2**31), flat_index


def probe_key(seed: int, path: str, flat_index: int) -> jax.Array:
    """The merge's probe key (drawn on device) for `probe_seed`."""
    seed, path_hash, flat_index = probe_seed(seed, path, flat_index)
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), path_hash), flat_index)


def host_probe(rng: np.random.Generator, layer_eqn: str, w_shape: tuple[int, ...]) -> np.ndarray:
    """A float32 standard-normal probe for `check_slice`, drawn on the host so no RNG is compiled per weight shape."""
    return rng.standard_normal(_probe_shape(layer_eqn, w_shape), dtype=np.float32)


@functools.partial(jax.jit, static_argnames=("delta_eqn", "layer_eqns", "out_dtype", "verify"))
def merge_slice(
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    factor: jax.Array,
    key: jax.Array,
    *,
    delta_eqn: str,
    layer_eqns: tuple[str, str, str],
    out_dtype: jnp.dtype,
    verify: bool,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns `w + factor * delta(a, b)` in `out_dtype`, and float32 statistics of this slice.

    `layer_eqns` are the layer equation and openpi's two LoRA equations, in letters. With `verify`, a random probe
    goes through openpi's LoRA forward (base einsum + scaled two-step LoRA einsum, all float32) and through the
    plain einsum with the merged weight: `err_max` is max|difference| (`err_stored_max`: with the weight as stored),
    `want_max` max|LoRA output|; their ratio is the slice's relative error (`slice_chunks.SliceMerge` forms it, over all pieces).
    """
    f32 = jnp.float32
    w32, a32, b32 = w.astype(f32), a.astype(f32), b.astype(f32)
    merged, delta = merge_weight(w32, a32, b32, delta_eqn, factor), lora_delta(a32, b32, delta_eqn, factor)
    stored = merged.astype(out_dtype)
    stored32 = stored.astype(f32)
    # A bf16 output keeps (bf16(w + d) - w) of the delta d; the base itself is exactly representable when stored bf16.
    bf16_kept = merged.astype(jnp.bfloat16).astype(f32) - w32
    base_sq, lost_sq, finite = _row_sums(jnp.square(w32), jnp.square(bf16_kept - delta), jnp.isfinite(merged))
    stats = {
        "delta_norm": _delta_norm(delta_eqn, a32, b32, factor),
        "base_norm": jnp.sqrt(base_sq),
        "bf16_lost_norm": jnp.sqrt(lost_sq),
        "adapters_finite": jnp.all(jnp.isfinite(a32)) & jnp.all(jnp.isfinite(b32)),
        "merged_finite": finite,
    }
    if verify:
        eqn = layer_eqns[0]
        x = jax.random.normal(key, _probe_shape(eqn, w.shape), f32)
        want = _lora_forward(x, w32, a32, b32, factor, layer_eqns)
        stats["err_max"] = jnp.max(jnp.abs(_layer_einsum(eqn, x, merged) - want))
        stats["err_stored_max"] = jnp.max(jnp.abs(_layer_einsum(eqn, x, stored32) - want))
        stats["want_max"] = jnp.max(jnp.abs(want))
    return stored, stats


@functools.partial(jax.jit, static_argnames=("delta_eqn", "layer_eqns"))
def check_slice(
    stored: jax.Array,
    w: jax.Array,
    a: jax.Array,
    b: jax.Array,
    factor: jax.Array,
    x: jax.Array,
    *,
    delta_eqn: str,
    layer_eqns: tuple[str, str, str],
) -> dict[str, jax.Array]:
    """Checks a merged slice as stored on disk against openpi's LoRA forward of (w, a, b) on the probe `x`.

    `rel_err`: max|x.stored - lora(x)| / max|lora(x)|, what `merge_slice` records as `rel_err_stored`.
    `rounding`: the part of that error a correct merge gets from being stored in `stored.dtype`: `rel_err_stored`
    minus `rel_err` of `merge_slice` on the same probe (exactly 0 for float32, ~2e-3 for bfloat16).
    """
    f32 = jnp.float32
    w32, a32, b32 = w.astype(f32), a.astype(f32), b.astype(f32)
    eqn = layer_eqns[0]
    want = _lora_forward(x, w32, a32, b32, factor, layer_eqns)
    merged = merge_weight(w32, a32, b32, delta_eqn, factor)
    rounded = merged.astype(stored.dtype).astype(f32)
    rounding = _rel_err(_layer_einsum(eqn, x, rounded), want) - _rel_err(_layer_einsum(eqn, x, merged), want)
    return {
        "rel_err": _rel_err(_layer_einsum(eqn, x, stored.astype(f32)), want),
        "rounding": jnp.maximum(rounding, 0.0),
        "finite": jnp.all(jnp.isfinite(stored)),
    }
