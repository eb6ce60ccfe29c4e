"""openpi's LoRA adapters as PEFT LoRA adapters of the `nn.Linear` a PyTorch layout makes of their weight.

PEFT's `LoraLayer` on a `Linear` of weight `W[out, in]` adds `scaling * lora_B @ lora_A` (`lora_A.weight` is
`[r, in]`, `lora_B.weight` is `[out, r]`, `scaling = lora_alpha / r`). openpi's adapter of a weight `w` adds
`scale * einsum(delta_equation, lora_a, lora_b)` (`equations.delta_equation`, derived from openpi's own two LoRA
einsums), and the layout turns `w` (one layer slice, one half of a split axis) into `W` by transposes and reshapes.

`factoring` (from shapes, before any array is read) factors that delta, laid out, as PEFT's product, from the
equation's structure alone: every label of `lora_a` and `lora_b` is on the Linear's output side, its input side, or
summed. The rank index is every label the
two share (openpi's rank label, and a head or key-value-head label both carry: `q_einsum`, `kv_einsum`), every
`lora_a` label on the output side and every `lora_b` label on the input side; where such a label is also a weight
axis, the other factor gets an identity over it (block structure: `q_einsum`'s `lora_B` is block-diagonal over
heads, so its PEFT rank is heads x L). A label one factor has alone and the weight does not is summed first
(`attn_vec_einsum`'s `lora_b` over heads: its PEFT rank stays L). Each PEFT factor is made of one openpi factor
alone: `Factoring.ops` says how, as layout ops on its layer slice (take the split, sum, place on a diagonal or beside
an identity, transpose, reshape), which an export applies as it applies any tensor's (`formats/tensors.apply`: the
values copied, or summed in float64, then stored as float32).

`peft_alpha` gives the `lora_alpha` whose `alpha / r` (PEFT, without rsLoRA) is openpi's scale exactly: openpi's
`alpha / rank`, `alpha / sqrt(rank)` with rsLoRA, or 1 for the feed-forward LoRA (openpi never scales it).
PEFT's own `use_rslora` (`alpha / sqrt(r)`) cannot express it, since r is not openpi's rank.

Structure only: shapes and labels in, ops out; no arrays, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
from typing import Literal

import numpy as np

from openpi_merge_plugin.lora import equations as eq

# A layout op, as `formats/tensors` spells them: ("transpose", axes), ("reshape", shape), and for LoRA factors
# ("take", (axis, index)), ("sum", axes), ("diagonal", (axis,)): a new last axis, the array on the diagonal of it and
# `axis`; ("identity", (n,)): two new last axes of size n, the array times the identity on them.
Op = tuple[str, tuple[int, ...]]
Factor = Literal["A", "B"]  # PEFT's lora_A (made of openpi's lora_a) or lora_B (of lora_b)


class PeftLayoutError(ValueError):
    """A weight whose layout is not one `nn.Linear`, or whose adapter no PEFT LoRA of it can express."""


@dataclasses.dataclass(frozen=True)
class LinearLoRA:
    """One adapter as PEFT holds it on one `nn.Linear`."""

    lora_a: np.ndarray  # lora_A.weight, [rank, in_features], float32
    lora_b: np.ndarray  # lora_B.weight, [out_features, rank], float32
    alpha: float  # lora_alpha: alpha / rank is openpi's scale, exactly

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def scaling(self) -> float:
        """What PEFT multiplies `lora_B @ lora_A` by (`LoraLayer.update_layer`, use_rslora False)."""
        return self.alpha / self.rank

    def delta(self) -> np.ndarray:
        """`scaling * lora_B @ lora_A` in float64: the change PEFT makes to the Linear's weight."""
        return self.scaling * (self.lora_b.astype(np.float64) @ self.lora_a.astype(np.float64))


@dataclasses.dataclass(frozen=True)
class LinearAxes:
    """Which labels of the weight make the Linear's output and input features, in C order."""

    out_labels: str
    in_labels: str


def peft_alpha(scale: float, rank: int) -> float:
    """The `lora_alpha` whose `lora_alpha / rank` (Python floats, as PEFT computes its scaling) is closest to `scale`:
    exactly `scale` wherever a float divides to it (not every float is a quotient by a rank that is not a power of
    two; then one float64 ulp off, far below float32)."""
    candidates = [scale * rank]
    for direction in (math.inf, -math.inf):
        alpha = candidates[0]
        for _ in range(4):
            alpha = math.nextafter(alpha, direction)
            candidates.append(alpha)
    return min(candidates, key=lambda alpha: (abs(alpha / rank - scale), abs(alpha - scale * rank)))


def linear_axes(labels: str, shape: Sequence[int], ops: Sequence[Op]) -> LinearAxes:
    """Follows the weight's labels through the layout's transposes and reshapes (which may only merge neighbouring
    axes) to a two-axis `[out, in]` weight."""
    axes: list[str] = list(labels)  # each axis: the labels it holds, in C order
    sizes = [int(n) for n in shape]
    if len(labels) != len(sizes):
        raise PeftLayoutError(f"labels {labels!r} do not fit shape {list(shape)}")
    for op, arg in ops:
        if op == "transpose":
            axes, sizes = [axes[i] for i in arg], [sizes[i] for i in arg]
        elif op == "reshape":
            axes, sizes = _merged_axes(axes, sizes, tuple(arg), labels)
        else:
            raise PeftLayoutError(f"unknown layout op {op!r}")
    if len(axes) != 2:
        raise PeftLayoutError(f"the layout of {labels!r} gives {len(axes)} axes {sizes}, not a Linear's [out, in]")
    return LinearAxes(axes[0], axes[1])


def _merged_axes(axes: list[str], sizes: list[int], target: tuple[int, ...], labels: str):
    merged, merged_sizes, i = [], [], 0
    for want in target:
        group, n = "", 1
        while i < len(axes) and n < want:  # a size-1 axis goes with the axes after it (it changes no index)
            group, n = group + axes[i], n * sizes[i]
            i += 1
        if n != want:
            raise PeftLayoutError(f"the layout of {labels!r} reshapes {sizes} to {list(target)}: it splits an axis")
        merged.append(group)
        merged_sizes.append(n)
    if i < len(axes):  # trailing size-1 axes join the last one
        if any(sizes[j] != 1 for j in range(i, len(axes))):
            raise PeftLayoutError(f"the layout of {labels!r} reshapes {sizes} to {list(target)}")
        merged[-1] += "".join(axes[i:])
    return merged, merged_sizes


@dataclasses.dataclass(frozen=True)
class Factoring:
    """How one adapter's layer slice becomes PEFT's two factors on one Linear, read off the equation and shapes."""

    equation: str  # the adapter's delta equation (`a,b->w`, letters)
    split: int | None
    a_labels: str  # after the split is taken and lone labels summed
    b_labels: str
    axes: LinearAxes
    rank_labels: str
    sizes: dict[str, int]

    @property
    def rank(self) -> int:
        return math.prod(self.sizes[c] for c in self.rank_labels)

    @property
    def in_features(self) -> int:
        return math.prod(self.sizes[c] for c in self.axes.in_labels)

    @property
    def out_features(self) -> int:
        return math.prod(self.sizes[c] for c in self.axes.out_labels)

    def shape(self, factor: Factor) -> tuple[int, int]:
        """PEFT's `lora_A.weight` [rank, in] or `lora_B.weight` [out, rank]."""
        return (self.rank, self.in_features) if factor == "A" else (self.out_features, self.rank)

    def ops(self, factor: Factor) -> tuple[Op, ...]:
        """The layout ops that make PEFT's factor from one layer slice of openpi's `lora_a` ("A") or `lora_b` ("B"):
        the split taken, the labels this factor has alone summed, a rank label that is also a feature of this side
        (the input for A, the output for B) placed on a diagonal (or beside an identity, where the factor lacks
        it), then transposed and reshaped to `shape(factor)`."""
        a_full, b_full, w_full = eq.split_equation(self.equation)
        labels = list(a_full if factor == "A" else b_full)
        keep = self.a_labels if factor == "A" else self.b_labels
        features = self.axes.in_labels if factor == "A" else self.axes.out_labels
        ops: list[Op] = []
        if self.split is not None and w_full[0] in labels:
            ops.append(("take", (labels.index(w_full[0]), self.split)))
            labels.remove(w_full[0])
        if alone := tuple(i for i, c in enumerate(labels) if c not in keep):
            ops.append(("sum", alone))
            labels = [c for c in labels if c in keep]
        # Each axis: (label, role); the factor's own rank labels index PEFT's rank.
        axes = [(c, "rank" if c in self.rank_labels else "feature") for c in labels]
        for c in self.rank_labels:
            if c not in features:
                continue
            if c in labels:
                ops.append(("diagonal", (labels.index(c),)))
                axes.append((c, "feature"))
            else:
                ops.append(("identity", (self.sizes[c],)))
                axes += [(c, "rank"), (c, "feature")]
        ranks = [(c, "rank") for c in self.rank_labels]
        feats = [(c, "feature") for c in features]
        want = (ranks + feats) if factor == "A" else (feats + ranks)
        if sorted(want) != sorted(axes):
            raise PeftLayoutError(f"{self.equation}: factor {factor} has axes {axes}, PEFT's factor {want}")
        order = [axes.index(x) for x in want]
        if order != list(range(len(order))):
            ops.append(("transpose", tuple(order)))
        ops.append(("reshape", self.shape(factor)))
        return tuple(ops)


def factoring(
    delta: eq.DeltaEquation,
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *,
    split: int | None = None,
    ops: Sequence[Op] = (),
) -> Factoring:
    """The factoring of one layer slice of an adapter (`a_shape`, `b_shape` without the scanned depth axes) onto the
    Linear made of that slice's weight by taking `[split]` of its first axis (a weight that holds two Linears:
    `kv_einsum`, `gating_einsum`) and applying the layout's `ops`."""
    a_labels, b_labels, w_labels = eq.split_equation(delta.equation)
    if len(a_shape) != len(a_labels) or len(b_shape) != len(b_labels):
        raise PeftLayoutError(f"lora_a {list(a_shape)} / lora_b {list(b_shape)} do not fit {delta.equation}")
    sizes: dict[str, int] = {}
    for labels, shape in ((a_labels, a_shape), (b_labels, b_shape)):
        for c, n in zip(labels, shape, strict=True):
            if sizes.setdefault(c, int(n)) != n:
                raise PeftLayoutError(f"label {c!r} of {delta.equation} has sizes {sizes[c]} and {n}")
    if split is not None:
        label, w_labels = w_labels[0], w_labels[1:]
        a_labels, b_labels = a_labels.replace(label, ""), b_labels.replace(label, "")
    # A label one factor has alone, not a weight axis, is summed on its own (openpi's second einsum does that).
    a_labels, b_labels = (
        "".join(c for c in a_labels if c in b_labels + w_labels),
        "".join(c for c in b_labels if c in a_labels + w_labels),
    )
    axes = linear_axes(w_labels, [sizes[c] for c in w_labels], ops)
    rank_labels = "".join(c for c in a_labels if c in b_labels or c in axes.out_labels)
    rank_labels += "".join(c for c in b_labels if c in axes.in_labels and c not in a_labels)
    return Factoring(delta.equation, split, a_labels, b_labels, axes, rank_labels, sizes)
