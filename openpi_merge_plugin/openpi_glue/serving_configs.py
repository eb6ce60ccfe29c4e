"""Serving configs: for a LoRA train config NAME, `get_config("NAME_merged")` is its non-LoRA twin.

Resolved on lookup rather than registered up front, so that it also works for train configs that users or tools
add to openpi's registry after import, and in a fresh process (`scripts/serve_policy.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from openpi_merge_plugin import serving

_VARIANT_FIELDS = ("paligemma_variant", "action_expert_variant")
_LORA_SUFFIX = "_lora"


def serving_config(train_config: Any) -> Any | None:
    """The same config with the non-LoRA variant of each expert, no freeze filter and no merge; None if no LoRA.

    The non-LoRA variant of `X_lora` is `X` (openpi's naming: gemma_2b_lora -> gemma_2b); it must exist.
    """
    import flax.nnx as nnx

    from openpi_merge_plugin import openpi_compat

    model = train_config.model
    lora = {f: getattr(model, f) for f in _VARIANT_FIELDS if str(getattr(model, f, "")).endswith(_LORA_SUFFIX)}
    if not lora:
        return None
    plain = {f: v.removesuffix(_LORA_SUFFIX) for f, v in lora.items()}
    _, get_variant = openpi_compat.model_variants(model)
    for variant in plain.values():
        try:
            get_variant(variant)
        except ValueError:
            return None
    changes: dict[str, Any] = {
        "name": serving.serving_config_name(train_config.name),
        "model": dataclasses.replace(model, **plain),
        "freeze_filter": nnx.Nothing(),
    }
    if hasattr(train_config, "merge_lora_on_save"):
        changes["merge_lora_on_save"] = False
    return dataclasses.replace(train_config, **changes)


def patch_get_config(module: Any) -> None:
    """Wraps openpi's `get_config` so that serving names resolve (other names behave exactly as before)."""
    original = module.get_config
    if getattr(original, "openpi_merge_plugin_patched", False):
        return

    @functools.wraps(original)
    def get_config(config_name: str) -> Any:
        try:
            return original(config_name)
        except ValueError:
            base = module._CONFIGS_DICT.get(config_name.removesuffix(serving.SERVING_SUFFIX))  # noqa: SLF001
            if config_name.endswith(serving.SERVING_SUFFIX) and base is not None:
                twin = serving_config(base)
                if twin is not None:
                    return twin
            raise

    get_config.openpi_merge_plugin_patched = True  # type: ignore[attr-defined]
    module.get_config = get_config
