"""The tensors of LeRobot 0.6.1's `PI0Policy` / `PI05Policy` / `PI0FastPolicy` state dict, from merged JAX params.

LeRobot's keys are openpi's `PI0Pytorch` keys with a `model.` prefix (docs/lerobot.md), so the tensors are those of
`pytorch_layout`'s one table (`layout_table`, or its PaliGemma part for pi0-FAST), renamed. What differs:
- `embed_tokens` is not tied to `lm_head` in LeRobot: both are written (openpi ties them: the same values).
- dtypes follow the policy config's `dtype` as `to_bfloat16_for_selected_params` sets them: "float32" all float32;
  "bfloat16" every tensor of `paligemma_with_expert` bfloat16 except those whose name holds one of
  `KEEP_FLOAT32` (the whole vision tower and projector, the norms), and the top-level projections float32.
  A bfloat16 tensor is bf16(x) (round to nearest even), a float32 one is exactly x.
- LeRobot builds its Gemma experts only as `gemma_2b` / `gemma_300m` and hard-codes SigLIP So400m/14 at 224 px,
  the vocabulary and a 2048-wide projector: any other dimension is refused unless `allow_nonstandard_dims`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.formats.tensors import Kind
from openpi_merge_plugin.formats.tensors import detect_kind

PREFIX = "model."
# LeRobot's get_gemma_config (modeling_pi0.py, modeling_pi05.py, modeling_pi0_fast.py): the only dims it builds.
GEMMA_VARIANTS = {
    "gemma_2b": layout.GemmaDims(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": layout.GemmaDims(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
}
ROLE_DEFAULT_VARIANT = {"paligemma": "gemma_2b", "action_expert": "gemma_300m"}  # LeRobot's config defaults
# to_bfloat16_for_selected_params: substrings of parameter names kept in float32 under dtype "bfloat16".
KEEP_FLOAT32 = ("vision_tower", "multi_modal_projector", "input_layernorm", "post_attention_layernorm", "model.norm")
_BF16_MODULE = PREFIX + "paligemma_with_expert."  # the module that method casts; the rest stays float32


@dataclasses.dataclass(frozen=True)
class LeRobotLayout:
    """The entries of model.safetensors (`pytorch_layout.TensorSpec`s under LeRobot names) and what was decided."""

    tensors: tuple[layout.TensorSpec, ...]
    kind: Kind
    precision: layout.Precision
    paligemma_variant: str
    action_expert_variant: str
    # Dimensions LeRobot cannot build (written anyway with allow_nonstandard_dims): name -> (model's, LeRobot's).
    nonstandard_dims: dict[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def tensor_dtype(name: str, precision: layout.Precision) -> layout.Precision:
    """The dtype of LeRobot's parameter `name` (with `model.`) when its config has `dtype == precision`."""
    if precision == "float32" or not name.startswith(_BF16_MODULE):
        return "float32"
    return "float32" if any(s in name for s in KEEP_FLOAT32) else "bfloat16"


def variant_of(dims: layout.GemmaDims) -> str | None:
    """The LeRobot variant with exactly these dims, or None."""
    return layout.variant_of(dims, GEMMA_VARIANTS)


def nonstandard_dims(
    paligemma: layout.GemmaDims, action_expert: layout.GemmaDims | None, model_dims: Mapping[str, Any]
) -> dict[str, tuple[Any, Any]]:
    """Everything LeRobot hard-codes that this model does not have: name -> (model's, LeRobot's)."""
    found = dict(layout.nonstandard_dims(model_dims))  # SigLIP, vocabulary, projector: the same as PI0Pytorch's
    roles = {"paligemma": paligemma, "action_expert": action_expert}
    for role, dims in roles.items():
        if dims is not None and variant_of(dims) is None:
            want = GEMMA_VARIANTS[ROLE_DEFAULT_VARIANT[role]]
            found[f"{role}_dims"] = (dataclasses.asdict(dims), dataclasses.asdict(want))
    return found


def build_lerobot_layout(
    params: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    paligemma: layout.GemmaDims,
    action_expert: layout.GemmaDims | None,
    action_dim: int | None,
    precision: layout.Precision = "float32",
    allow_nonstandard_dims: bool = False,
) -> LeRobotLayout:
    """The entries of the model.safetensors LeRobot loads for these params (path -> (shape, dtype)).

    `action_expert` and `action_dim` are None for pi0-FAST (one expert, no action projections).
    """
    if precision not in ("float32", "bfloat16"):
        raise layout.LayoutError(f"precision must be 'float32' or 'bfloat16', not {precision!r}")
    kind = detect_kind(params)
    dims = layout.model_dims(params, paligemma)
    if kind == "pi0_fast":
        table = layout.paligemma_table(paligemma, dims)
        note = f"pi0-FAST, paligemma {paligemma}"
    else:
        if action_expert is None or action_dim is None:
            raise layout.LayoutError(f"a {kind} tree needs the action expert's dims and action_dim")
        table = layout.layout_table(paligemma, action_expert, action_dim, pi05=kind == "pi05", dims=dims)
        note = f"{kind}, paligemma {paligemma}, action expert {action_expert}, action_dim={action_dim}"
    layout.check_tree(params, {leaf.path: leaf.shape for leaf in table if leaf.path is not None}, note)
    differ = nonstandard_dims(paligemma, action_expert if kind != "pi0_fast" else None, dims)
    if differ and not allow_nonstandard_dims:
        listed = ", ".join(f"{k} {mine} (LeRobot: {theirs})" for k, (mine, theirs) in differ.items())
        raise layout.NonstandardDimsError(
            f"LeRobot 0.6.1 builds only gemma_2b / gemma_300m experts, SigLIP So400m/14 at 224 px, a vocabulary of "
            f"{layout.VOCAB_SIZE} and a {layout.PROJECTION_DIM}-wide projector; this model differs: {listed}. "
            "Pass --allow-nonstandard-dims to write it anyway (it then loads only into a LeRobot patched to these "
            "dimensions)"
        )
    # embed_tokens (an alias of lm_head in PI0Pytorch) is its own tensor in LeRobot, equal to lm_head.
    entries = sorted(
        (
            _spec(params, PREFIX + torch_name, leaf, layer, split, precision)
            for name, leaf, layer, split in layout.pytorch_tensors(table)
            for torch_name in (name, *leaf.aliases)
        ),
        key=lambda s: s.name,
    )
    variants = {
        role: variant_of(d) or ROLE_DEFAULT_VARIANT[role]
        for role, d in (("paligemma", paligemma), ("action_expert", action_expert))
        if d is not None
    }
    return LeRobotLayout(
        tuple(entries),
        kind,
        precision,
        variants["paligemma"],
        variants.get("action_expert", ROLE_DEFAULT_VARIANT["action_expert"]),  # pi0-FAST: unused, LeRobot's default
        differ,
    )


def _spec(params, name: str, leaf: layout.Leaf, layer, split, precision) -> layout.TensorSpec:
    src_shape, shape = layout.tensor_shapes(params, leaf, layer, split)
    dtype = tensor_dtype(name, precision)
    recipe = layout.Recipe(leaf.path, src_shape, layer, split, leaf.ops, dtype == "bfloat16", dtype, shape)
    return layout.TensorSpec(name, shape, {"float32": "F32", "bfloat16": "BF16"}[dtype], dtype, recipe)
