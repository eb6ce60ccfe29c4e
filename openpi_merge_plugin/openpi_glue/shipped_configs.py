"""The train configs in configs/openpi_train_configs.json, and the `dummy_lora` gemma variant they use."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Any

from openpi_merge_plugin import openpi_glue
from openpi_merge_plugin.serving import variants

CONFIGS_FILE = "openpi_train_configs.json"
DUMMY_LORA = "dummy_lora"
DUMMY_FAST_LORA = "dummy_fast_lora"


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
    variants.register(gemma, DUMMY_LORA, lambda: dataclasses.replace(gemma.get_config("dummy"), lora_configs=_lora()))


def add_dummy_fast_lora_variant(gemma_fast: Any) -> None:
    """`dummy_fast_lora`: a pi0-FAST gemma of the `dummy` size (width 64, depth 4, a 2048-token vocabulary, which
    holds the fake data's tokens), with `dummy_lora`'s LoRA configs. openpi ships no small gemma_fast variant."""

    def make() -> Any:
        import ml_collections

        return ml_collections.ConfigDict(
            {
                "variant": DUMMY_FAST_LORA,
                "width": 64,
                "depth": 4,
                "mlp_dim": 128,
                "num_heads": 8,
                "num_kv_heads": 1,
                "head_dim": 16,
                "norm_eps": 1e-6,
                "vocab_size": 2048,
                "scan": True,
                "remat_policy": "nothing_saveable",
                "lora_configs": _lora(),
            }
        )

    variants.register(gemma_fast, DUMMY_FAST_LORA, make)


def _lora() -> dict[str, Any]:
    from openpi.models import lora

    return {"attn": lora.LoRAConfig(rank=4, alpha=8.0), "ffn": lora.LoRAConfig(rank=2, alpha=4.0, rslora=True)}


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
    """`base` with the entry's model and train changes (and the model's own freeze filter if the model changed).

    `model` replaces fields of the base's model config, or, with `model_class` ("module.Class"), makes a model config
    of that class from them.
    """
    changes: dict[str, Any] = {"name": entry["name"], **entry.get("train", {})}
    if entry.get("model") or entry.get("model_class"):
        if entry.get("model_class"):
            module, cls = entry["model_class"].rsplit(".", 1)
            model = getattr(importlib.import_module(module), cls)(**entry.get("model", {}))
        else:
            model = dataclasses.replace(base.model, **entry["model"])
        changes |= {"model": model, "freeze_filter": model.get_freeze_filter()}
    return dataclasses.replace(base, **changes)
