"""Find the LoRA adapters in a flat param tree, pair each with its base weight, its equation and its LoRA config.

Works on shapes only (`{path: (shape, dtype)}`), so it runs on full-size trees without allocating them.
Paths are '/'-joined, as `openpi.models.model.restore_params` returns them (no trailing `value`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import re

import numpy as np

from openpi_merge_plugin.errors import AdapterError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora.spec import ExpertLoRA
from openpi_merge_plugin.lora.spec import LoRASpec

# openpi's `lora.Einsum` modules keep `w`, `lora_a`, `lora_b` in one module; `lora.FeedForward` keeps `<name>`,
# `<name>_lora_a`, `<name>_lora_b` side by side.
EINSUM_MODULES = ("q_einsum", "kv_einsum", "qkv_einsum", "attn_vec_einsum")
FFN_WEIGHTS = ("gating_einsum", "linear")
_EXPERT_SUFFIX = re.compile(r"^(?P<name>.+?)(?:_(?P<index>\d+))?$")


@dataclasses.dataclass(frozen=True)
class ShapeDtype:
    shape: tuple[int, ...]
    dtype: str


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapted weight: where its pieces live and exactly how openpi applies them."""

    base_path: str
    a_path: str
    b_path: str
    module: str  # e.g. "q_einsum_1", "mlp_1/linear"
    kind: str  # "attn" (lora.Einsum, scaled) or "ffn" (lora.FeedForward, never scaled)
    expert: int
    rank: int
    lead_shape: tuple[int, ...]  # scanned depth axes in front of the per-layer weight
    delta: eq.DeltaEquation
    spec: LoRASpec
    scale: float  # what openpi multiplies the LoRA term by

    @property
    def num_slices(self) -> int:
        return int(np.prod(self.lead_shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class _Candidate:
    base_path: str
    a_path: str | None
    b_path: str | None
    module: str
    weight_name: str  # key into MODULE_EQUATIONS
    kind: str
    expert: int


def is_lora_path(path: str) -> bool:
    """True for every leaf that looks LoRA-related; each one must be merged or reported."""
    return "lora" in path.lower()


def _split_expert(name: str) -> tuple[str, int]:
    m = _EXPERT_SUFFIX.match(name)
    assert m is not None
    return m["name"], int(m["index"] or 0)


def _candidates(tree: Mapping[str, ShapeDtype]) -> list[_Candidate]:
    lora_paths = sorted(p for p in tree if is_lora_path(p))
    found: dict[str, _Candidate] = {}
    for path in lora_paths:
        *parents, leaf = path.split("/")
        if leaf in ("lora_a", "lora_b"):
            if not parents:
                raise AdapterError(f"adapter {path}: not inside a module")
            module = parents[-1]
            weight_name, expert = _split_expert(module)
            if weight_name not in EINSUM_MODULES:
                raise AdapterError(
                    f"adapter {path}: module {module!r} is not one of openpi's LoRA einsums {list(EINSUM_MODULES)}"
                )
            base = "/".join([*parents, "w"])
            kind = "attn"
            module_id = module
        elif m := re.fullmatch(r"(?P<w>.+)_lora_(?P<ab>[ab])", leaf):
            weight_name = m["w"]
            if weight_name not in FFN_WEIGHTS or not parents:
                raise AdapterError(f"adapter {path}: {weight_name!r} is not one of openpi's LoRA MLP weights")
            _, expert = _split_expert(parents[-1])
            base = "/".join([*parents, weight_name])
            kind = "ffn"
            module_id = f"{parents[-1]}/{weight_name}"
        else:
            raise AdapterError(f"LoRA leaf {path}: not an openpi adapter (expected lora_a/lora_b or <w>_lora_a/_b)")
        cand = found.get(base) or _Candidate(base, None, None, module_id, weight_name, kind, expert)
        is_a = leaf.endswith("a")
        cand = dataclasses.replace(cand, **({"a_path": path} if is_a else {"b_path": path}))
        found[base] = cand
    return list(found.values())


def expert_widths(tree: Mapping[str, ShapeDtype]) -> dict[int, int]:
    """Model width of each expert, read from its MLP `linear` weight ([..., hidden, width])."""
    widths = {}
    for path, sd in tree.items():
        parts = path.split("/")
        if parts[-1] == "linear" and len(parts) > 1 and parts[-2].startswith("mlp"):
            widths[_split_expert(parts[-2])[1]] = sd.shape[-1]
    return widths


def adapter_ranks(tree: Mapping[str, ShapeDtype]) -> dict[tuple[int, str], set[int]]:
    """Ranks found in the checkpoint per (expert, kind), read off `lora_b` shapes."""
    ranks: dict[tuple[int, str], set[int]] = {}
    for cand in _candidates(tree):
        # Shipped modules use axes (-2, -1); find_adapters checks shapes against the real axes later.
        found = ranks.setdefault((cand.expert, cand.kind), set())
        if cand.a_path is not None:
            found.add(tree[cand.a_path].shape[-1])
        if cand.b_path is not None:
            found.add(tree[cand.b_path].shape[-2])
    return ranks


def find_adapters(
    tree: Mapping[str, ShapeDtype], experts: Sequence[ExpertLoRA] | Mapping[int, ExpertLoRA]
) -> list[Adapter]:
    """Finds and checks every adapter of `tree`. Anything LoRA-like that does not fit raises, naming its path."""
    expert_map = dict(enumerate(experts)) if isinstance(experts, Sequence) else dict(experts)
    adapters = []
    for cand in _candidates(tree):
        missing = [name for name, p in (("lora_a", cand.a_path), ("lora_b", cand.b_path)) if p is None]
        if missing:
            present = cand.a_path or cand.b_path
            raise AdapterError(f"adapter {present}: its partner {missing[0]} is missing")
        assert cand.a_path is not None
        assert cand.b_path is not None
        if cand.base_path not in tree:
            raise AdapterError(f"adapter {cand.a_path}: base weight {cand.base_path} is missing")
        if cand.expert not in expert_map:
            raise ConfigError(
                f"adapter {cand.a_path} belongs to expert {cand.expert}, but the LoRA config has no such expert "
                f"(experts: {sorted(expert_map)})"
            )
        spec = expert_map[cand.expert].get(cand.kind)
        if spec is None:
            raise ConfigError(
                f"adapter {cand.a_path}: the LoRA config of expert {cand.expert} "
                f"({expert_map[cand.expert].variant}) has no {cand.kind!r} LoRA, but the checkpoint has adapters"
            )
        adapters.append(_check_adapter(tree, cand, spec))
    return sorted(adapters, key=lambda a: a.base_path)


def _check_adapter(tree: Mapping[str, ShapeDtype], cand: _Candidate, spec: LoRASpec) -> Adapter:
    assert cand.a_path is not None
    assert cand.b_path is not None
    layer_eqn = eq.MODULE_EQUATIONS[cand.weight_name]
    # lora.FeedForward ignores LoRAConfig.axes/label and never scales; lora.Einsum honours both.
    axes, label, scale = (spec.axes, spec.label, spec.scaling_value) if cand.kind == "attn" else ((-2, -1), "L", 1.0)
    try:
        delta = eq.delta_equation(layer_eqn, axes, label)
    except eq.EquationError as e:
        raise AdapterError(f"adapter {cand.a_path}: {e}") from e
    w_shape = tree[cand.base_path].shape
    a_shape = tree[cand.a_path].shape
    b_shape = tree[cand.b_path].shape
    per_layer = len(eq.split_equation(layer_eqn)[1])
    n_lead = len(w_shape) - per_layer
    if n_lead < 0:
        raise AdapterError(f"base weight {cand.base_path}: shape {list(w_shape)} has fewer axes than {layer_eqn}")
    lead = tuple(w_shape[:n_lead])
    for path, shape in ((cand.a_path, a_shape), (cand.b_path, b_shape)):
        if len(shape) != len(w_shape) or tuple(shape[:n_lead]) != lead:
            raise AdapterError(
                f"adapter {path}: shape {list(shape)} does not match base weight {cand.base_path} {list(w_shape)}"
            )
    layer_w = list(w_shape[n_lead:])
    rank = a_shape[n_lead:][axes[1]]
    expect_a, expect_b = list(layer_w), list(layer_w)
    expect_a[axes[1]] = rank
    expect_b[axes[0]] = rank
    if list(a_shape[n_lead:]) != expect_a:
        raise AdapterError(
            f"adapter {cand.a_path}: shape {list(a_shape)} does not match base weight {cand.base_path} "
            f"{list(w_shape)} (expected {[*lead, *expect_a]})"
        )
    if list(b_shape[n_lead:]) != expect_b:
        raise AdapterError(
            f"adapter {cand.b_path}: shape {list(b_shape)} does not fit lora_a {list(a_shape)} and base "
            f"{list(w_shape)} (expected {[*lead, *expect_b]}: rank {rank})"
        )
    if rank != spec.rank:
        raise ConfigError(
            f"adapter {cand.a_path}: checkpoint has rank {rank}, the LoRA config of expert {cand.expert} "
            f"says rank {spec.rank}"
        )
    return Adapter(
        base_path=cand.base_path,
        a_path=cand.a_path,
        b_path=cand.b_path,
        module=cand.module,
        kind=cand.kind,
        expert=cand.expert,
        rank=rank,
        lead_shape=lead,
        delta=delta,
        spec=spec,
        scale=scale,
    )


def merged_structure(tree: Mapping[str, ShapeDtype], adapters: Sequence[Adapter], dtype_of) -> dict[str, ShapeDtype]:
    """Shape/dtype tree of the merge result: adapters dropped, adapted bases re-typed by `dtype_of(adapter)`."""
    drop = {p for a in adapters for p in (a.a_path, a.b_path)}
    retype = {a.base_path: a for a in adapters}
    out = {}
    for path, sd in tree.items():
        if path in drop:
            continue
        out[path] = ShapeDtype(sd.shape, dtype_of(retype[path])) if path in retype else sd
    return out
