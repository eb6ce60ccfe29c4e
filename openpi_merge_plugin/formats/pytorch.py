"""openpi's PyTorch checkpoint: `model.safetensors`, `config.json` and the checkpoint's `assets/`, as upstream's
`examples/convert_jax_model_to_pytorch.py` (15a9616) writes them, for `PI0Pytorch` (pi0 and pi0.5).

The file holds the tensors `safetensors.torch.save_model(PI0Pytorch(cfg))` writes: names, shapes, dtypes, file order
and values, tensor for tensor (checked against upstream's converter), without its problems: the model (pi0 or
pi0.5) and every dim come from the params, not from a config name or the path, and the PaliGemma `o_proj` is laid
out right whatever its width (upstream's reshape assumes width == heads x head_dim).

Precision, as upstream: the converter copies float32 values into a `PI0Pytorch` built with the config's `dtype`,
whose bfloat16 parameters round them (round to nearest even), then casts the whole model to `precision`. So with
precision "bfloat16" every tensor is `bf16(x)`; with "float32" a tensor is `f32(bf16(x))` if its parameter is
bfloat16 in PI0Pytorch (`param_dtype`), else exactly `x`. With model dtype "float32" no parameter is bfloat16
(`to_bfloat16_for_selected_params("float32")` is a plain `.to(float32)`), so nothing is rounded in float32 output.

Fixed by PI0Pytorch, whatever the JAX model: vocabulary 257152, SigLIP So400m/14 at 224 px, and a multimodal
projector of output width 2048 (gemma_2b's). A model whose dimensions differ cannot be loaded by upstream's PyTorch
model, so it is refused, naming them, unless `allow_nonstandard_dims` (the file then has the JAX dimensions and loads
only into a PI0Pytorch built with them).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
from typing import Any

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import base
from openpi_merge_plugin.formats.tensors import EMBED_TOKENS
from openpi_merge_plugin.formats.tensors import LM_HEAD
from openpi_merge_plugin.formats.tensors import SAFETENSORS_DTYPES
from openpi_merge_plugin.formats.tensors import GemmaDims
from openpi_merge_plugin.formats.tensors import LayoutError
from openpi_merge_plugin.formats.tensors import NonstandardDimsError
from openpi_merge_plugin.formats.tensors import Precision
from openpi_merge_plugin.formats.tensors import Recipe
from openpi_merge_plugin.formats.tensors import TensorSpec
from openpi_merge_plugin.formats.tensors import check_tree
from openpi_merge_plugin.formats.tensors import detect_pi05
from openpi_merge_plugin.formats.tensors import dims_from_params
from openpi_merge_plugin.formats.tensors import layout_table
from openpi_merge_plugin.formats.tensors import model_dims
from openpi_merge_plugin.formats.tensors import nonstandard_dims
from openpi_merge_plugin.formats.tensors import pytorch_tensors
from openpi_merge_plugin.formats.tensors import tensor_shapes

CONFIG_FILE = "config.json"
# to_bfloat16_for_selected_params: parameters (names relative to paligemma_with_expert) kept in float32.
KEEP_FLOAT32 = (
    "vision_tower.vision_model.embeddings.patch_embedding.weight",
    "vision_tower.vision_model.embeddings.patch_embedding.bias",
    "vision_tower.vision_model.embeddings.position_embedding.weight",
    "input_layernorm",
    "post_attention_layernorm",
    "model.norm",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """All entries in file order (by name: one dtype), and the header metadata save_model writes."""

    tensors: tuple[TensorSpec, ...]
    metadata: dict[str, str]
    pi05: bool
    precision: Precision
    model_dtype: Precision
    # Dimensions that differ from PI0Pytorch's hard-coded ones (written anyway): name -> (model's, PI0Pytorch's).
    nonstandard_dims: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def by_name(self) -> dict[str, TensorSpec]:
        return {t.name: t for t in self.tensors}

    def state_dict_names(self) -> list[str]:
        """The names of PI0Pytorch's state dict (tied aliases included), sorted."""
        return sorted([t.name for t in self.tensors] + [a for t in self.tensors for a in t.aliases])


def param_dtype(name: str, model_dtype: Precision) -> str:
    """The dtype of PI0Pytorch's parameter `name` when built with `Pi0Config.dtype == model_dtype`."""
    prefix = "paligemma_with_expert."
    if model_dtype == "float32" or not name.startswith(prefix):
        return "float32"
    rel = name[len(prefix) :]
    return "float32" if any(s in rel for s in KEEP_FLOAT32) else "bfloat16"


def _spec(params: Mapping[str, Any], row: tuple, precision: Precision, model_dtype: Precision) -> TensorSpec:
    name, leaf, layer, split = row  # from `pytorch_tensors`
    src_shape, shape = tensor_shapes(params, leaf, layer, split)
    pdt = param_dtype(name, model_dtype)
    rounded = precision == "bfloat16" or pdt == "bfloat16"
    recipe = Recipe(leaf.path, src_shape, layer, split, leaf.ops, round_bf16=rounded, dtype=precision, shape=shape)
    return TensorSpec(name, shape, SAFETENSORS_DTYPES[precision], pdt, recipe, leaf.aliases)


def build_layout(
    params: Mapping[str, tuple[tuple[int, ...], str]],
    *,
    paligemma: GemmaDims,
    action_expert: GemmaDims,
    action_dim: int,
    precision: Precision = "bfloat16",
    model_dtype: Precision = "bfloat16",
    pi05: bool | None = None,
    allow_nonstandard_dims: bool = False,
) -> Layout:
    """The entries of upstream's model.safetensors for these params, in file order.

    `pi05` is `Pi0Config.pi05`; None detects it from the tree (`detect_pi05`), and a value the tree contradicts is an
    error. `model_dtype` is `Pi0Config.dtype`. Dims are checked against every shape of `params`.
    """
    if precision not in SAFETENSORS_DTYPES:
        raise LayoutError(f"precision must be 'float32' or 'bfloat16', not {precision!r}")
    if model_dtype not in SAFETENSORS_DTYPES:
        raise LayoutError(f"model dtype (Pi0Config.dtype) must be 'float32' or 'bfloat16', not {model_dtype!r}")
    tree_pi05 = detect_pi05(params)
    if pi05 is not None and bool(pi05) != tree_pi05:
        raise LayoutError(f"config says pi05={pi05}, but the params are those of {'pi0.5' if tree_pi05 else 'pi0'}")
    pi05 = tree_pi05
    pg, ae = paligemma, action_expert
    for f in ("depth", "num_heads", "num_kv_heads", "head_dim"):
        if getattr(pg, f) != getattr(ae, f):
            raise LayoutError(f"paligemma and action expert must have equal {f} (JAX scans them together): {pg}, {ae}")
    dims = model_dims(params, pg)
    table = layout_table(pg, ae, action_dim, pi05=pi05, dims=dims)
    expected = {leaf.path: leaf.shape for leaf in table if leaf.path is not None}
    check_tree(params, expected, f"paligemma {pg}, action expert {ae}, action_dim={action_dim}, pi05={pi05}")
    nonstandard = nonstandard_dims(dims)
    if nonstandard and not allow_nonstandard_dims:
        differ = ", ".join(f"{k} {mine} (PI0Pytorch: {theirs})" for k, (mine, theirs) in nonstandard.items())
        raise NonstandardDimsError(
            f"upstream's PI0Pytorch hard-codes dimensions this model does not have: {differ}; it cannot load this "
            "export. Pass --allow-nonstandard-dims to write it anyway (it then loads only into a PI0Pytorch built "
            "with these dimensions)"
        )

    entries = [_spec(params, row, precision, model_dtype) for row in pytorch_tensors(table)]
    entries.sort(key=lambda s: s.name)
    return Layout(tuple(entries), {EMBED_TOKENS: LM_HEAD}, pi05, precision, model_dtype, nonstandard)


def config_json(
    *, action_dim: int, action_horizon: int, paligemma_variant: str, action_expert_variant: str, precision: Precision
) -> str:
    """The text of upstream's config.json (`json.dump(..., indent=2)`, no trailing newline)."""
    if precision not in SAFETENSORS_DTYPES:
        raise LayoutError(f"precision must be 'float32' or 'bfloat16', not {precision!r}")
    d = {
        "action_dim": action_dim,
        "action_horizon": action_horizon,
        "paligemma_variant": paligemma_variant,
        "action_expert_variant": action_expert_variant,
        "precision": precision,
    }
    return json.dumps(d, indent=2)


def plan(given: base.PlanInput) -> base.FormatPlan:
    """The file of `given.structure` (merged params: pi0 or pi0.5), config.json and assets/; reads only shapes."""
    structure, facts, precision = given.structure, given.facts, given.options.precision_or()
    tree = base.merged_shape_table(structure, given.what)
    try:
        paligemma, expert = dims_from_params(structure, ""), dims_from_params(structure, "_1")
        action_dim = int(tree["action_in_proj/kernel"][0][0])
        layout = build_layout(
            tree,
            paligemma=paligemma,
            action_expert=expert,
            action_dim=action_dim,
            precision=precision,
            model_dtype=facts.model_dtype,
            pi05=facts.pi05,
            allow_nonstandard_dims=given.options.allow_nonstandard_dims,
        )
    except NonstandardDimsError as e:
        raise ConfigError(str(e)) from e
    except LayoutError as e:
        raise ConfigError(f"{given.what}: {e}") from e
    config = config_json(
        action_dim=action_dim,
        action_horizon=facts.action_horizon,
        paligemma_variant=facts.variants[0],
        action_expert_variant=facts.variants[1],
        precision=precision,
    )
    model = {
        "paligemma_variant": facts.variants[0],
        "action_expert_variant": facts.variants[1],
        "action_horizon": facts.action_horizon,
        "model_dtype": facts.model_dtype,
        "pi05": layout.pi05,
        "config_name": facts.config_name,
        "action_dim": action_dim,
    }
    return base.FormatPlan(
        tensors=layout.tensors,
        metadata=layout.metadata,
        files={CONFIG_FILE: config.encode()},
        copies={"assets": given.assets} if given.assets is not None and given.assets.is_dir() else {},
        manifest={
            "model": model,
            "precision_rules": (
                "bfloat16: every tensor bf16(x); float32: f32(bf16(x)) for every parameter PI0Pytorch holds in "
                f"bfloat16 under Pi0Config.dtype={facts.model_dtype!r}, x exactly for the rest (as upstream's "
                "converter)"
            ),
            # Written with --allow-nonstandard-dims: loads only into a PI0Pytorch built with these dimensions.
            "nonstandard_dims": {k: {"model": m, "pi0pytorch": t} for k, (m, t) in layout.nonstandard_dims.items()},
            "tied": layout.metadata,
        },
        precision=precision,
    )


def describe(manifest: Mapping[str, Any]) -> list[str]:
    lines = []
    if manifest["nonstandard_dims"]:
        lines.append(
            f"dimensions PI0Pytorch does not hard-code (--allow-nonstandard-dims): {', '.join(manifest['nonstandard_dims'])}"
        )
    config = manifest.get("serving_config") or manifest["model"]["config_name"]
    if config:
        lines.append(
            f"serve with config {config}: scripts/serve_policy.py policy:checkpoint --policy.config={config} "
            f"--policy.dir={manifest['output']}"
        )
    return lines


FORMAT = base.Format("pytorch", plan, options=frozenset({"model_dtype"}), describe=describe)
