"""The tensors every export format is made of: openpi's JAX params and the `PI0Pytorch` tensors they become.

`layout_table` is the one table of JAX leaves (`path -> (shape, dtype)`, no `params` root) and the tensors of
upstream's `PI0Pytorch` state dict made of them (`examples/convert_jax_model_to_pytorch.py` at 15a9616: names,
shapes, the transposes and reshapes); every format reads it, through `pytorch_tensors` (LeRobot's names are
PI0Pytorch's with a prefix). A format's tensor is a `TensorSpec` whose `Recipe` says how `apply` makes its values
from one source leaf or layer slice. What the params' structure says of the model is read here too: pi0, pi0.5 or
pi0-FAST (`detect_kind`), each expert's dims (`dims_from_params`) and the dimensions PI0Pytorch hard-codes
(`model_dims`). Only numpy is used; reading arrays and writing files are the pipeline's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
import dataclasses
import math
from typing import Any, Literal

import ml_dtypes
import numpy as np

Precision = Literal["float32", "bfloat16"]
Kind = Literal["pi0", "pi05", "pi0_fast"]  # the model, as the params' structure tells it (LeRobot's policy `type`)

VOCAB_SIZE = 257152
PROJECTION_DIM = 2048  # PaliGemmaWithExpertModel: vision_config.projection_dim = 2048
VISION = {"width": 1152, "depth": 27, "mlp_dim": 4304, "num_heads": 16, "head_dim": 72, "patch": 14, "positions": 256}

PG = "paligemma_with_expert.paligemma."
VM = PG + "model.vision_tower.vision_model."
LM = PG + "model.language_model."
EX = "paligemma_with_expert.gemma_expert."
LM_HEAD = PG + "lm_head.weight"
EMBED_TOKENS = LM + "embed_tokens.weight"  # tied to LM_HEAD; save_model keeps the smaller name, LM_HEAD
EXPERT_LM_HEAD = EX + "lm_head.weight"  # no JAX source (random init upstream, never used): written as zeros
_IMG = "PaliGemma/img/"  # JAX prefixes, for the table and the dims read off the params
_ENC = _IMG + "Transformer/encoderblock/"
_EMBEDDING = "PaliGemma/llm/embedder/input_embedding"
_EXPERT_Q = "PaliGemma/llm/layers/attn/q_einsum_1/w"  # the action expert's first leaf: pi0 and pi0.5 have one

SOURCE_DTYPES = ("float32", "bfloat16", "float16", "float64")
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16"}
_NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


class LayoutError(ValueError):
    """The JAX params, dims or options do not describe a model upstream's PyTorch export can hold."""


class NonstandardDimsError(LayoutError):
    """A model PI0Pytorch cannot be built for (its hard-coded dimensions differ); writable on request."""


@dataclasses.dataclass(frozen=True)
class GemmaDims:
    """One expert's dims, as `openpi.models.gemma.get_config(variant)` gives them."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> GemmaDims:
        """From any object with these attributes (e.g. openpi's `gemma.Config`)."""
        return cls(**{f.name: int(getattr(config, f.name)) for f in dataclasses.fields(cls)})


# openpi 15a9616 `gemma.get_config`: the dims of its variants (the LoRA ones have those of their base), by name.
OPENPI_VARIANTS = {
    "gemma_2b": GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaDims(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
}


Op = tuple[str, tuple[int, ...]]  # ("transpose", axes) or ("reshape", shape); a LoRA factor's also LORA_OPS
T: Op = ("transpose", (1, 0))
# The ops that make a PEFT LoRA factor of one openpi factor (`lora/peft_adapter.Factoring.ops`): ("take", (axis,
# index)); ("sum", axes); ("diagonal", (axis,)): a new last axis, the array on the diagonal of it and `axis`;
# ("identity", (n,)): two new last axes of size n, the array times the identity on them. Applied in float64.
LORA_OPS = frozenset({"take", "sum", "diagonal", "identity"})


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One row of the layout table: a JAX leaf, its shape under the dims, and the PI0Pytorch tensors made of it."""

    path: str | None  # JAX path (no `params` root); None: no JAX source, the tensor is zeros of `shape`
    shape: tuple[int, ...]
    names: tuple[str, ...]  # PyTorch names, "{i}" for the layer; two: one per half of the split axis (k/v, gate/up)
    ops: tuple[Op, ...] = ()
    aliases: tuple[str, ...] = ()  # tied state-dict names save_model drops in favour of names[0]

    @property
    def scanned(self) -> bool:
        """Axis 0 is the layer (JAX scans the depth): one tensor per layer."""
        return "{i}" in self.names[0]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one output tensor is made: `source[layer][split]`, as float32, then `ops`, then rounding and cast."""

    source: str | None  # JAX path; None: zeros
    source_shape: tuple[int, ...] | None
    layer: int | None  # index on the scanned depth axis
    split: int | None  # index on the next axis (kv_einsum: k/v, gating_einsum: gate/up)
    ops: tuple[Op, ...]
    round_bf16: bool  # values are bf16(x), whatever the output dtype
    dtype: Precision  # output dtype
    shape: tuple[int, ...]  # output shape


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One entry of model.safetensors."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype: "F32" or "BF16"
    param_dtype: str  # the dtype of the runtime's parameter (PI0Pytorch under the config's dtype, LeRobot's policy)
    recipe: Recipe
    aliases: tuple[str, ...] = ()  # tied state-dict names that save_model drops in favour of this one

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _NP_DTYPES[self.recipe.dtype].itemsize


def detect_pi05(params: Mapping[str, Any]) -> bool:
    """Whether the tree is pi0.5's (time_mlp_* and adaRMS expert norms) rather than pi0's (state_proj, ...)."""
    keys = set(params)
    five = {"time_mlp_in/kernel", "PaliGemma/llm/final_norm_1/Dense_0/kernel"} <= keys
    zero = {"state_proj/kernel", "PaliGemma/llm/final_norm_1/scale"} <= keys
    if five == zero:
        raise LayoutError("cannot tell pi0 from pi0.5: the tree has neither or both of their projection/norm params")
    return five


def detect_kind(params: Mapping[str, Any]) -> Kind:
    """pi0-FAST has one Gemma expert (no `_1` leaves); pi0 and pi0.5 are told apart by `detect_pi05`."""
    if _EXPERT_Q not in params:
        return "pi0_fast"
    return "pi05" if detect_pi05(params) else "pi0"


def dims_from_params(tree: Mapping[str, Any], suffix: str) -> GemmaDims:
    """One expert's dims read off its params ('' = PaliGemma, '_1' = the action expert); structure, not names."""
    base = "PaliGemma/llm/layers/"
    if f"{base}attn/qkv_einsum{suffix}/w" in tree:
        raise LayoutError(
            f"expert {suffix or '0'} uses qkv_einsum (as many kv heads as heads): PI0Pytorch's checkpoint layout, "
            "like upstream's converter, covers q_einsum + kv_einsum (openpi's variants) only"
        )
    try:
        depth, heads, width, head_dim = _shape(tree[f"{base}attn/q_einsum{suffix}/w"])
        kv_heads = _shape(tree[f"{base}attn/kv_einsum{suffix}/w"])[2]
        mlp_dim = _shape(tree[f"{base}mlp{suffix}/gating_einsum"])[-1]
    except KeyError as e:
        raise LayoutError(
            f"not a pi0/pi0.5 params tree: no {e.args[0]} (pi0-FAST has no PyTorch model upstream)"
        ) from e
    return GemmaDims(width, depth, mlp_dim, heads, kv_heads, head_dim)


def _shape(leaf: Any) -> tuple[int, ...]:
    """A leaf's shape, from an array, a ShapeDtype or a (shape, dtype) pair."""
    return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(leaf[0])


def variant_of(dims: GemmaDims, variants: Mapping[str, GemmaDims] | None = None) -> str | None:
    """The name of the gemma variant (openpi's, by default) with exactly these dims, or None."""
    return next((name for name, want in (variants or OPENPI_VARIANTS).items() if want == dims), None)


def model_dims(params: Mapping[str, Any], paligemma: GemmaDims) -> dict[str, Any]:
    """The dimensions PI0Pytorch hard-codes, as this model has them: SigLIP's, the vocabulary, the projector width.

    Read off the params; what is missing there keeps PI0Pytorch's value (the tree check then names the missing leaf).
    """

    def shape(path: str) -> tuple[int, ...] | None:
        return tuple(params[path][0]) if path in params else None

    vision = dict(VISION)
    if (query := shape(f"{_ENC}MultiHeadDotProductAttention_0/query/kernel")) and len(query) == 4:
        vision["depth"], vision["width"], vision["num_heads"], vision["head_dim"] = query
    if (mlp := shape(f"{_ENC}MlpBlock_0/Dense_0/kernel")) and len(mlp) == 3:
        vision["mlp_dim"] = mlp[-1]
    if (patch := shape(_IMG + "embedding/kernel")) and len(patch) == 4:
        vision["patch"] = patch[0]
    if (positions := shape(_IMG + "pos_embedding")) and len(positions) == 3:
        vision["positions"] = positions[1]
    embedding = shape(_EMBEDDING)
    return {
        "vision": vision,
        "vocab_size": embedding[0] if embedding else VOCAB_SIZE,
        "projection_dim": paligemma.width,
    }


def nonstandard_dims(dims: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """Each dimension of `model_dims` that differs from PI0Pytorch's hard-coded one: name -> (model's, PI0Pytorch's)."""
    found = {f"siglip_{k}": (v, VISION[k]) for k, v in dims["vision"].items() if v != VISION[k]}
    if dims["vocab_size"] != VOCAB_SIZE:
        found["vocab_size"] = (dims["vocab_size"], VOCAB_SIZE)
    if dims["projection_dim"] != PROJECTION_DIM:
        found["projection_dim"] = (dims["projection_dim"], PROJECTION_DIM)
    return found


def _leaf(path: str | None, shape: tuple[int, ...], names: str | tuple[str, ...], *ops: Op, **kw: Any) -> Leaf:
    return Leaf(path, shape, (names,) if isinstance(names, str) else names, ops, **kw)


def _vision_leaves(v: Mapping[str, int], pg: GemmaDims) -> Iterator[Leaf]:
    dv, lv, fv, nv, hv, p = v["width"], v["depth"], v["mlp_dim"], v["num_heads"], v["head_dim"], v["patch"]
    img, e, a, lay = _IMG, _ENC, _ENC + "MultiHeadDotProductAttention_0/", VM + "encoder.layers.{i}."
    emb = VM + "embeddings."
    yield _leaf(img + "embedding/kernel", (p, p, 3, dv), emb + "patch_embedding.weight", ("transpose", (3, 2, 0, 1)))
    yield _leaf(img + "embedding/bias", (dv,), emb + "patch_embedding.bias")
    pos = ("reshape", (v["positions"], dv))
    yield _leaf(img + "pos_embedding", (1, v["positions"], dv), emb + "position_embedding.weight", pos)
    for ln, tn in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
        yield _leaf(f"{e}{ln}/scale", (lv, dv), f"{lay}{tn}.weight")
        yield _leaf(f"{e}{ln}/bias", (lv, dv), f"{lay}{tn}.bias")
    for jn, tn, d_in, d_out in (("Dense_0", "fc1", dv, fv), ("Dense_1", "fc2", fv, dv)):
        yield _leaf(f"{e}MlpBlock_0/{jn}/kernel", (lv, d_in, d_out), f"{lay}mlp.{tn}.weight", T)
        yield _leaf(f"{e}MlpBlock_0/{jn}/bias", (lv, d_out), f"{lay}mlp.{tn}.bias")
    for jn, tn in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        yield _leaf(f"{a}{jn}/kernel", (lv, dv, nv, hv), f"{lay}self_attn.{tn}.weight", ("reshape", (dv, nv * hv)), T)
        yield _leaf(f"{a}{jn}/bias", (lv, nv, hv), f"{lay}self_attn.{tn}.bias", ("reshape", (nv * hv,)))
    yield _leaf(f"{a}out/kernel", (lv, nv, hv, dv), f"{lay}self_attn.out_proj.weight", ("reshape", (nv * hv, dv)), T)
    yield _leaf(f"{a}out/bias", (lv, dv), f"{lay}self_attn.out_proj.bias")
    yield _leaf(img + "Transformer/encoder_norm/scale", (dv,), VM + "post_layernorm.weight")
    yield _leaf(img + "Transformer/encoder_norm/bias", (dv,), VM + "post_layernorm.bias")
    yield _leaf(img + "head/kernel", (dv, pg.width), PG + "model.multi_modal_projector.linear.weight", T)
    yield _leaf(img + "head/bias", (pg.width,), PG + "model.multi_modal_projector.linear.bias")


def _gemma_leaves(c: GemmaDims, prefix: str, sfx: str, *, ada: bool) -> Iterator[Leaf]:
    """One expert (`sfx` "" PaliGemma's, "_1" the action expert's); `ada`: adaRMS norms (pi0.5's action expert)."""
    t, lay = "PaliGemma/llm/layers/", prefix + "layers.{i}."
    d, n, k, h, w, f = c.depth, c.num_heads, c.num_kv_heads, c.head_dim, c.width, c.mlp_dim
    sa, qkv = lay + "self_attn.", ("transpose", (0, 2, 1))
    yield _leaf(f"{t}attn/q_einsum{sfx}/w", (d, n, w, h), sa + "q_proj.weight", qkv, ("reshape", (n * h, w)))
    kv = (sa + "k_proj.weight", sa + "v_proj.weight")
    yield _leaf(f"{t}attn/kv_einsum{sfx}/w", (d, 2, k, w, h), kv, qkv, ("reshape", (k * h, w)))
    yield _leaf(f"{t}attn/attn_vec_einsum{sfx}/w", (d, n, h, w), sa + "o_proj.weight", ("reshape", (n * h, w)), T)
    gate_up = (lay + "mlp.gate_proj.weight", lay + "mlp.up_proj.weight")
    yield _leaf(f"{t}mlp{sfx}/gating_einsum", (d, 2, w, f), gate_up, T)
    yield _leaf(f"{t}mlp{sfx}/linear", (d, f, w), lay + "mlp.down_proj.weight", T)
    norms = (
        (f"{t}pre_attention_norm{sfx}/", lay + "input_layernorm.", (d,)),
        (f"{t}pre_ffw_norm{sfx}/", lay + "post_attention_layernorm.", (d,)),
        (f"PaliGemma/llm/final_norm{sfx}/", prefix + "norm.", ()),
    )
    for jn, tn, lead in norms:
        if ada:
            yield _leaf(jn + "Dense_0/kernel", (*lead, w, 3 * w), tn + "dense.weight", T)
            yield _leaf(jn + "Dense_0/bias", (*lead, 3 * w), tn + "dense.bias")
        else:
            yield _leaf(jn + "scale", (*lead, w), tn + "weight")


def layout_table(
    paligemma: GemmaDims, action_expert: GemmaDims, action_dim: int, *, pi05: bool, dims: Mapping[str, Any]
) -> tuple[Leaf, ...]:
    """Every JAX leaf of the model (each path once) and what it becomes in PI0Pytorch; `dims` from `model_dims`.

    The one place the JAX paths are spelled: the tree check, `build_layout` and any other output format (renaming
    the PyTorch names, see `pytorch_tensors`) read it.
    """
    pg, ae = paligemma, action_expert
    leaves = [*paligemma_table(pg, dims), *_gemma_leaves(ae, EX + "model.", "_1", ada=pi05)]
    leaves.append(_leaf(None, (dims["vocab_size"], ae.width), EXPERT_LM_HEAD))
    w = ae.width
    projs = {"action_in_proj": (action_dim, w), "action_out_proj": (w, action_dim)}
    if pi05:
        projs |= {"time_mlp_in": (w, w), "time_mlp_out": (w, w)}
    else:
        projs |= {"state_proj": (action_dim, w), "action_time_mlp_in": (2 * w, w), "action_time_mlp_out": (w, w)}
    for k, s in projs.items():
        leaves += [_leaf(f"{k}/kernel", s, f"{k}.weight", T), _leaf(f"{k}/bias", (s[1],), f"{k}.bias")]
    return tuple(leaves)


def paligemma_table(paligemma: GemmaDims, dims: Mapping[str, Any]) -> tuple[Leaf, ...]:
    """The PaliGemma part of `layout_table` (SigLIP, projector, embedding, the first expert): all of pi0-FAST."""
    embedding = _leaf(_EMBEDDING, (dims["vocab_size"], paligemma.width), LM_HEAD, aliases=(EMBED_TOKENS,))
    return (*_vision_leaves(dims["vision"], paligemma), embedding, *_gemma_leaves(paligemma, LM, "", ada=False))


def pytorch_tensors(table: Iterable[Leaf]) -> Iterator[tuple[str, Leaf, int | None, int | None]]:
    """Each PI0Pytorch tensor of the table, in table order: (name, its leaf, layer, split).

    The rest of its recipe (source, ops, aliases) is the leaf's. A format whose keys are PI0Pytorch's, mapped (LeRobot),
    renames `name` and writes the same tensors.
    """
    for leaf in table:
        for layer in range(leaf.shape[0]) if leaf.scanned else (None,):
            halves = enumerate(leaf.names) if len(leaf.names) > 1 else [(None, leaf.names[0])]
            for split, name in halves:
                yield name.format(i=layer), leaf, layer, split


def check_tree(params: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], dims_note: str) -> None:
    problems = []
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing:
        problems.append(f"missing params: {missing}")
    if extra:
        problems.append(f"params PI0Pytorch has no place for (unmerged LoRA leaves?): {extra}")
    for path in sorted(set(expected) & set(params)):
        shape, dtype = params[path]
        if tuple(shape) != expected[path]:
            problems.append(f"{path}: shape {tuple(shape)}, expected {expected[path]}")
        if str(dtype) not in SOURCE_DTYPES:
            problems.append(f"{path}: dtype {dtype} is not one of {SOURCE_DTYPES}")
    if problems:
        raise LayoutError(f"JAX params do not match {dims_note}:\n  " + "\n  ".join(problems))


def tensor_shapes(
    params: Mapping[str, Any], leaf: Leaf, layer: int | None, split: int | None
) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """(the source leaf's shape or None for zeros, the output tensor's shape) of one `pytorch_tensors` row."""
    if leaf.path is None:
        return None, leaf.shape
    src_shape = tuple(params[leaf.path][0])
    shape = src_shape[(layer is not None) + (split is not None) :]
    for op, arg in leaf.ops:
        shape = tuple(shape[i] for i in arg) if op == "transpose" else tuple(arg)
    return src_shape, shape


def apply(recipe: Recipe, array: Any = None) -> np.ndarray:
    """The output tensor (C-contiguous) from the whole source array or its layer slice (None for zeros).

    Values as upstream's: `f32(source)`, laid out by `ops`, rounded to bfloat16 if `round_bf16`, cast to the
    output dtype. Rounding and casts are elementwise, so they are done where they are cheapest: on the contiguous
    source (a bfloat16 array is laid out as its 16-bit patterns, half the bytes of float32) and, for float32 output,
    by widening the laid-out bfloat16 bits (`_widen_bf16`), bitwise as ml_dtypes casts them.
    """
    out_dtype = _NP_DTYPES[recipe.dtype]
    if recipe.source is None:
        return np.zeros(recipe.shape, out_dtype)
    a = np.asarray(array)
    if recipe.layer is not None and a.shape == recipe.source_shape:
        a = a[recipe.layer]
    want = recipe.source_shape[1:] if recipe.layer is not None else recipe.source_shape
    if a.shape != want:
        what = f"layer {recipe.layer} of " if recipe.layer is not None else ""
        raise LayoutError(f"{what}{recipe.source}: got shape {a.shape}, expected {want} (or {recipe.source_shape})")
    if str(a.dtype) not in SOURCE_DTYPES:
        raise LayoutError(f"{recipe.source}: dtype {a.dtype} is not one of {SOURCE_DTYPES}")
    if recipe.split is not None:
        a = a[recipe.split]
    if any(op in LORA_OPS for op, _ in recipe.ops):
        return _lora_factor(a, recipe)
    bf16_source = a.dtype == ml_dtypes.bfloat16
    if not bf16_source:
        a = a.astype(np.float32, copy=False)  # upstream restores with dtype="float32"
        if recipe.round_bf16 or recipe.dtype == "bfloat16":
            a = a.astype(ml_dtypes.bfloat16)
    if a.dtype != ml_dtypes.bfloat16:  # float32, not rounded: laid out as it is
        return _copied(*_laid_out_view(a, recipe.ops), np.float32)
    bits, shape = _laid_out_view(a.view(np.uint16), recipe.ops)
    if recipe.dtype == "float32":
        if bits.flags.c_contiguous:  # nothing to move: ml_dtypes' cast is the one pass
            return bits.reshape(shape).view(ml_dtypes.bfloat16).astype(np.float32)
        wide = _copied(bits, shape, np.uint32)  # f32 of a bf16: its 16 bits as the high half (as ml_dtypes casts)
        wide <<= 16
        return wide.view(np.float32)
    bits = _copied(bits, shape, np.uint16)
    if bf16_source:  # bf16 -> f32 -> bf16 is exact, but for NaNs: ml_dtypes gives each its quiet NaN
        nan = (bits & 0x7FFF) > 0x7F80
        if nan.any():
            bits = bits.copy()
            bits[nan] = bits[nan].view(ml_dtypes.bfloat16).astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    return bits.view(ml_dtypes.bfloat16)


def _lora_factor(a: np.ndarray, recipe: Recipe) -> np.ndarray:
    """A tensor with LoRA ops (a PEFT factor: small): every op on float64 values (a sum exact to float64), then
    rounded and cast as any tensor is."""
    x = np.asarray(a, np.float64)
    for op, arg in recipe.ops:
        if op == "transpose":
            x = x.transpose(arg)
        elif op == "reshape":
            x = x.reshape(arg)
        elif op == "take":
            x = np.take(x, arg[1], axis=arg[0])
        elif op == "sum":
            x = x.sum(axis=arg)
        elif op == "diagonal":
            n, index = x.shape[arg[0]], np.arange(x.shape[arg[0]])
            moved = np.moveaxis(x, arg[0], -1)
            out = np.zeros((*moved.shape, n))
            out[..., index, index] = moved  # copied: off the diagonal +0.0, whatever the array holds
            x = np.moveaxis(out, -2, arg[0])
        elif op == "identity":
            index = np.arange(arg[0])
            out = np.zeros((*x.shape, arg[0], arg[0]))
            out[..., index, index] = x[..., None]
            x = out
        else:
            raise LayoutError(f"{recipe.source}: unknown layout op {op!r}")
    if x.shape != recipe.shape:
        raise LayoutError(f"{recipe.source}: the ops give shape {x.shape}, expected {recipe.shape}")
    out = x.astype(np.float32)
    if recipe.round_bf16 or recipe.dtype == "bfloat16":
        out = out.astype(ml_dtypes.bfloat16)
    return np.ascontiguousarray(out.astype(_NP_DTYPES[recipe.dtype], copy=False))


TILE = 256  # rows and columns of one block of a transposing copy


def _laid_out_view(a: np.ndarray, ops: tuple[Op, ...]) -> tuple[np.ndarray, tuple[int, ...]]:
    """(`a` under `ops` up to its trailing reshapes, the output shape): views, but for a reshape before the last
    transpose that needs a copy. The trailing reshapes are left to the output (a C-order reshape of a contiguous
    array is a view), so that the one copy of a transpose goes straight into it."""
    tail = len(ops)
    while tail and ops[tail - 1][0] == "reshape":
        tail -= 1
    for op, arg in ops[:tail]:
        if op == "transpose":
            a = a.transpose(arg)
            continue
        view = _reshaped_view(a, arg)
        a = view if view is not None else _copy(a, np.empty(a.shape, a.dtype)).reshape(arg)
    return a, (ops[-1][1] if tail < len(ops) else a.shape)


def _reshaped_view(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """`a` reshaped without a copy, or None where its strides need one."""
    try:
        return np.reshape(a, shape, copy=False)  # numpy >= 2.1: ValueError where a copy is needed
    except TypeError:  # an older numpy, without `copy`: setting the shape of a view (deprecated from numpy 2.5)
        view = a.view()
        try:
            view.shape = shape
        except AttributeError:
            return None
        return view
    except ValueError:
        return None


def _copied(a: np.ndarray, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """`a` reshaped to `shape`, C-contiguous, as `dtype` (an exact widening or none): `a` itself if it is that."""
    if a.flags.c_contiguous and a.dtype == dtype:
        return a.reshape(shape)
    out = np.empty(shape, dtype)
    _copy(a, out.reshape(a.shape))
    return out


def _copy(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`out[...] = a`; a view whose fastest axis in memory is not its last (a transpose) in TILE x TILE blocks of
    those two axes, which stay in cache (numpy's strided copy of a large transpose misses it on every element)."""
    steps = [abs(s) if n > 1 else np.inf for s, n in zip(a.strides, a.shape, strict=True)]
    fast, last = (int(np.argmin(steps)), a.ndim - 1) if a.ndim > 1 else (0, 0)
    if fast == last or (a.shape[fast] <= TILE and a.shape[last] <= TILE):
        out[...] = a
        return out
    index = [slice(None)] * a.ndim
    for i in range(0, a.shape[fast], TILE):
        index[fast] = slice(i, i + TILE)
        for j in range(0, a.shape[last], TILE):
            index[last] = slice(j, j + TILE)
            out[tuple(index)] = a[tuple(index)]
    return out
