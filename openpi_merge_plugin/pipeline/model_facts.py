"""What the PyTorch export needs to know of the model beyond the merged params: its openpi model config (variants,
action horizon, dtype, pi0 or pi0.5), from openpi, the merge's record or the command line, and each expert's dims
read off the params."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import pathlib
from typing import Any, Literal, TypeVar

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.lora import openpi_configs

Precision = Literal["float32", "bfloat16"]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the export needs to know of the openpi model config beyond the params."""

    paligemma_variant: str
    action_expert_variant: str
    action_horizon: int
    model_dtype: Precision = "bfloat16"  # Pi0Config.dtype: which params PI0Pytorch rounds to bf16 on load
    pi05: bool | None = None  # None: told from the params
    config_name: str | None = None  # the openpi TrainConfig it came from


def dims_from_params(tree: dict[str, Any], suffix: str) -> layout.GemmaDims:
    """One expert's dims read off its params ('' = PaliGemma, '_1' = the action expert); structure, not names."""
    base = "PaliGemma/llm/layers/"
    if f"{base}attn/qkv_einsum{suffix}/w" in tree:
        raise ConfigError(
            f"expert {suffix or '0'} uses qkv_einsum (as many kv heads as heads): PI0Pytorch's checkpoint layout, "
            "like upstream's converter, covers q_einsum + kv_einsum (openpi's variants) only"
        )
    try:
        depth, heads, width, head_dim = tree[f"{base}attn/q_einsum{suffix}/w"].shape
        kv_heads = tree[f"{base}attn/kv_einsum{suffix}/w"].shape[2]
        mlp_dim = tree[f"{base}mlp{suffix}/gating_einsum"].shape[-1]
    except KeyError as e:
        raise ConfigError(
            f"not a pi0/pi0.5 params tree: no {e.args[0]} (pi0-FAST has no PyTorch model upstream)"
        ) from e
    return layout.GemmaDims(width, depth, mlp_dim, heads, kv_heads, head_dim)


def model_info_from_model(model: Any, *, config_name: str | None = None) -> ModelInfo:
    """The export's model info from an openpi model config (pi0 / pi0.5: two gemma experts)."""
    fields, _ = openpi_configs.model_variants(model)
    if len(fields) != 2:
        raise ConfigError(
            f"{config_name or 'the config'} is {type(model).__name__}: only pi0 and pi0.5 have a PyTorch model upstream"
        )
    return ModelInfo(
        model.paligemma_variant,
        model.action_expert_variant,
        int(model.action_horizon),
        model_dtype=str(model.dtype),
        pi05=bool(getattr(model, "pi05", False)),
        config_name=config_name,
    )


def model_info_from_openpi(config_name: str) -> ModelInfo:
    """The export's model info from a registered openpi TrainConfig (its serving twin's variants are LoRA-free)."""
    config = openpi_configs.train_config(config_name, without="; or pass --action-horizon")
    return model_info_from_model(config.model, config_name=config_name)


def model_info_from_record(manifest: dict[str, Any]) -> ModelInfo:
    """From the openpi config the merged manifest names: its serving config, else the LoRA config."""
    return from_recorded_config(
        manifest,
        model_info_from_openpi,
        needs="action_horizon, variants, dtype",
        otherwise="--action-horizon N (variants are then the manifest's)",
    )


def from_recorded_config(record: dict[str, Any], build: Callable[[str], T], *, needs: str, otherwise: str) -> T:
    """`build(name)` for the first openpi config a merge record names (its serving config, else the LoRA config)
    that builds; else one error naming why each failed."""
    names = [record.get("serving_config"), (record.get("lora_config") or {}).get("config_name")]
    problems = []
    for name in filter(None, names):
        try:
            return build(name)
        except ConfigError as e:
            problems.append(str(e))
    why = "; ".join(problems) or "the manifest names no openpi config"
    raise ConfigError(
        f"the export needs the model config ({needs}) and cannot get it: {why}. Pass --config NAME with openpi "
        f"importable, or {otherwise}"
    )


def model_info_from_manifest_variants(
    merged_dir: pathlib.Path, *, action_horizon: int, model_dtype: Precision = "bfloat16"
) -> ModelInfo:
    """Without openpi: the variant names the merged manifest records for each expert, and the given horizon."""
    manifest = json.loads((pathlib.Path(merged_dir) / _output.MANIFEST).read_text())
    return model_info_from_variants(manifest, action_horizon=action_horizon, model_dtype=model_dtype)


def model_info_from_variants(
    merge_record: dict[str, Any], *, action_horizon: int, model_dtype: Precision = "bfloat16"
) -> ModelInfo:
    """The variant names a merge records (its `lora_config`) for each expert, and the given horizon."""
    experts = (merge_record.get("lora_config") or {}).get("experts") or {}
    variants = [(experts.get(str(i)) or {}).get("variant") or "unknown" for i in (0, 1)]
    return ModelInfo(variants[0], variants[1], action_horizon, model_dtype=model_dtype)


def check_variants(model: ModelInfo, paligemma: layout.GemmaDims, expert: layout.GemmaDims) -> None:
    """With openpi here, the params' dims must be the config's variants' (LoRA variants have the same dims)."""
    try:
        from openpi.models import gemma
    except ImportError:
        return
    for variant, dims in ((model.paligemma_variant, paligemma), (model.action_expert_variant, expert)):
        try:
            want = layout.GemmaDims.of(gemma.get_config(variant))
        except Exception:  # an unknown variant name (e.g. taken from a manifest): the params decide
            continue
        if want != dims:
            raise ConfigError(f"variant {variant!r} has dims {want}, but the params have {dims}")
