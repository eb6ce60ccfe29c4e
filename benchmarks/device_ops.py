"""The jitted device ops of the floor, the naive merge and the kernel profile, compiled once per key."""

from __future__ import annotations

from typing import Any

import numpy as np

_JITS: dict[Any, Any] = {}


def _full_delta(a, b, eqn: str, n_lead: int, scale: float):
    import jax
    import jax.numpy as jnp

    key = ("delta", eqn, n_lead)
    if key not in _JITS:
        lead = "".join(c for c in "zyxwvu" if c not in eqn)[:n_lead]
        lhs, out = eqn.split("->")
        x, y = lhs.split(",")
        full = f"{lead}{x},{lead}{y}->{lead}{out}"
        _JITS[key] = jax.jit(
            lambda a, b, s: jnp.einsum(full, a.astype(jnp.float32), b, precision=jax.lax.Precision.HIGHEST) * s
        )
    return _JITS[key](a, b, np.float32(scale))


def _convert(out_dtype: str):
    import jax

    key = ("convert", out_dtype)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda x: x.astype(out_dtype))
    return _JITS[key]


def _add(w, delta, out_dtype: str):
    import jax
    import jax.numpy as jnp

    key = ("add", out_dtype)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(out_dtype))
    return _JITS[key](w, delta)
