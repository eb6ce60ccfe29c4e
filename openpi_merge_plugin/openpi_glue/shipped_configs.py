"""The train configs in configs/openpi_train_configs.json, and the `dummy_lora` gemma variant they use."""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import typing
from typing import Any

from openpi_merge_plugin import openpi_glue

CONFIGS_FILE = "openpi_train_configs.json"
DUMMY_LORA = "dummy_lora"


def configs_file() -> pathlib.Path:
    """configs/ inside the installed package (wheel), or next to it in a source checkout."""
    package = pathlib.Path(__file__).resolve().parents[1]
    for root in (package / "configs", package.parent / "configs"):
        if (root / CONFIGS_FILE).is_file():
            return root / CONFIGS_FILE
    raise FileNotFoundError(f"{CONFIGS_FILE} is neither in {package / 'configs'} nor in {package.parent / 'configs'}")


def add_dummy_lora_variant(gemma: Any) -> None:
    """`dummy_lora`: openpi's `dummy` gemma (width 64, depth 4) with LoRA on attention and FFN, for smoke tests.

    Attention uses rank 4, alpha 8 (scale 2); the FFN rank 2, alpha 4 with rsLoRA (scale 4/sqrt(2)), so a merge
    of it exercises both of openpi's scaling rules.
    """
    original = gemma.get_config
    if getattr(original, "openpi_merge_plugin_patched", False):
        return

    @functools.wraps(original)
    def get_config(variant: str) -> Any:
        if variant == DUMMY_LORA:
            from openpi.models import lora

            return dataclasses.replace(
                original("dummy"),
                lora_configs={
                    "attn": lora.LoRAConfig(rank=4, alpha=8.0),
                    "ffn": lora.LoRAConfig(rank=2, alpha=4.0, rslora=True),
                },
            )
        return original(variant)

    get_config.openpi_merge_plugin_patched = True  # type: ignore[attr-defined]
    gemma.get_config = get_config
    gemma.Variant = typing.Literal[(*typing.get_args(gemma.Variant), DUMMY_LORA)]


def register(config_module: Any) -> None:
    """Adds the shipped configs to openpi's registry (`_CONFIGS`, `_CONFIGS_DICT`); skips names already taken."""
    registry = config_module._CONFIGS_DICT  # noqa: SLF001
    for entry in json.loads(configs_file().read_text())["configs"]:
        if entry["name"] in registry:
            openpi_glue.inactive(f"config {entry['name']} is already registered; the plugin's was not added")
            continue
        if entry["base"] not in registry:
            openpi_glue.inactive(f"openpi has no config {entry['base']}; {entry['name']} was not added")
            continue
        config = build(registry[entry["base"]], entry)
        config_module._CONFIGS.append(config)  # noqa: SLF001
        registry[config.name] = config


def build(base: Any, entry: dict[str, Any]) -> Any:
    """`base` with the entry's model and train changes (and the model's own freeze filter if the model changed)."""
    changes: dict[str, Any] = {"name": entry["name"], **entry.get("train", {})}
    if entry.get("model"):
        model = dataclasses.replace(base.model, **entry["model"])
        changes |= {"model": model, "freeze_filter": model.get_freeze_filter()}
    return dataclasses.replace(base, **changes)
