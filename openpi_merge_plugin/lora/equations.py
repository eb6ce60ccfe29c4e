"""openpi's LoRA einsum equations, and the merged-delta einsum derived from them.

`make_lora_eqns` is a line-for-line port of `openpi.models.lora.Einsum._make_lora_eqns` (15a9616). The LoRA term
openpi adds at run time is

    einsum(eqn_b, einsum(eqn_a, x, lora_a), lora_b) * scaling_value

`delta_equation` rewrites that chain as a single einsum over (lora_a, lora_b) that yields a weight-shaped delta.
Labels of `lora_b` that the intermediate result does not carry are contracted on their own (for
`attn_vec_einsum`, `BTNH,NHD->BTD`, this sums `lora_b` over heads), so they get fresh labels.
"""

from __future__ import annotations

import dataclasses
import re
import string

# Equations openpi's gemma / gemma_fast call each adapted module with (per layer, without the scanned depth axis).
# `lora.FeedForward._dot` is `x @ w + (x @ a) @ b`: written as einsums so it goes through the same derivation.
MODULE_EQUATIONS: dict[str, str] = {
    "q_einsum": "BTD,NDH->BTNH",
    "kv_einsum": "BSD,2KDH->2BSKH",
    "qkv_einsum": "BSD,3KDH->3BSKH",
    "attn_vec_einsum": "BTNH,NHD->BTD",
    "gating_einsum": "BTD,GDF->GBTF",
    "linear": "BTF,FD->BTD",
}


class EquationError(ValueError):
    """An einsum equation the merge cannot turn into a weight delta."""


def split_equation(eqn: str) -> tuple[str, str, str]:
    if not (m := re.fullmatch("(.*),(.*)->(.*)", eqn)):
        raise EquationError(f"Unsupported einsum eqn: {eqn}")
    lhs, rhs, out = m.groups()
    return lhs, rhs, out


def make_lora_eqns(eqn: str, axes: tuple[int, int] = (-2, -1), label: str = "L") -> tuple[str, str]:
    """Port of `openpi.models.lora.Einsum._make_lora_eqns`."""
    if label in eqn:
        raise EquationError(f"{label} already in eqn: {eqn}")
    lhs, rhs, out = split_equation(eqn)
    a_label, b_label = (rhs[x] for x in axes)
    a_rhs = rhs.replace(b_label, label)
    a_out = out.replace(b_label, label)
    eqn_a = f"{lhs},{a_rhs}->{a_out}"
    b_rhs = rhs.replace(a_label, label)
    eqn_b = f"{a_out},{b_rhs}->{out}"
    return eqn_a, eqn_b


@dataclasses.dataclass(frozen=True)
class DeltaEquation:
    """`delta = einsum(equation, lora_a, lora_b)`, in letters jnp.einsum accepts."""

    equation: str
    layer_equation: str
    lora_equations: tuple[str, str]


def delta_equation(eqn: str, axes: tuple[int, int] = (-2, -1), label: str = "L") -> DeltaEquation:
    """Derives the einsum that turns (lora_a, lora_b) into the weight delta openpi's LoRA term amounts to.

    Raises `EquationError` if the LoRA term of `eqn` is not a linear map expressible by one weight of the layer's
    own shape (then no merge can be exact).
    """
    eqn_a, eqn_b = make_lora_eqns(eqn, axes, label)
    x_labels, w_labels, out_labels = split_equation(eqn)
    _, a_labels, mid_labels = split_equation(eqn_a)
    mid_check, b_labels, out_b = split_equation(eqn_b)
    assert mid_check == mid_labels
    assert out_b == out_labels
    for labels in (x_labels, w_labels, out_labels):
        if len(set(labels)) != len(labels):
            raise EquationError(f"repeated label in {eqn}: not supported")

    used = set(eqn_a + eqn_b)
    fresh = iter(c for c in string.ascii_letters if c not in used)
    # lora_a labels that reach neither x nor the intermediate are summed over lora_a alone.
    a_final = "".join(c if (c in x_labels or c in mid_labels) else next(fresh) for c in a_labels)
    # lora_b labels not carried by the intermediate are independent of lora_a (summed alone unless in the output).
    b_final = "".join(c if (c in mid_labels or c in out_labels) else next(fresh) for c in b_labels)

    # The merged weight contracts x over x_labels & w_labels and keeps out_labels, so:
    # batch labels (x and out, not w) must not touch the adapters; every weight label must come from an adapter.
    batch = (set(x_labels) & set(out_labels)) - set(w_labels)
    if batch & set(a_final + b_final):
        raise EquationError(f"LoRA term of {eqn} mixes batch labels {sorted(batch)} into the adapters")
    for c in w_labels:
        if c not in a_final + b_final:
            raise EquationError(f"weight label {c!r} of {eqn} is not produced by the adapters")
    for c in set(a_final) & set(x_labels):
        if c not in w_labels:
            raise EquationError(f"LoRA term of {eqn} contracts input label {c!r} the weight does not have")
    for c in x_labels:
        if c not in mid_labels and c not in a_labels:
            raise EquationError(f"LoRA term of {eqn} sums input label {c!r} without a weight")

    # jnp.einsum wants letters; openpi uses digits ("2KDH") as labels.
    letters = iter(c for c in string.ascii_letters if c not in set(a_final + b_final + w_labels))
    rename: dict[str, str] = {}
    for c in a_final + b_final + w_labels:
        if c not in rename:
            rename[c] = c if c.isalpha() else next(letters)
    spec = "".join(rename[c] for c in a_final) + "," + "".join(rename[c] for c in b_final)
    spec += "->" + "".join(rename[c] for c in w_labels)
    return DeltaEquation(equation=spec, layer_equation=eqn, lora_equations=(eqn_a, eqn_b))


def to_letters(*eqns: str) -> tuple[str, ...]:
    """Renames non-letter labels consistently across equations so jnp.einsum accepts them."""
    used = set("".join(eqns))
    letters = iter(c for c in string.ascii_letters if c not in used)
    rename: dict[str, str] = {}
    out = []
    for eqn in eqns:
        chars = []
        for c in eqn:
            if c in ",->" or c.isalpha():
                chars.append(c)
            else:
                rename.setdefault(c, next(letters))
                chars.append(rename[c])
        out.append("".join(chars))
    return tuple(out)
