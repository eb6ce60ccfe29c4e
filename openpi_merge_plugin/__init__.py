"""Merge openpi LoRA adapters into serving-ready checkpoints, with openpi's exact runtime semantics.

The public names are imported lazily, so that importing the package (as openpi's startup hook does) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ExpertLoRA": "openpi_merge_plugin.lora_spec",
    "LoRASource": "openpi_merge_plugin.api",
    "LoRASpec": "openpi_merge_plugin.lora_spec",
    "MergeError": "openpi_merge_plugin.errors",
    "MergeOptions": "openpi_merge_plugin.engine",
    "ResolvedLoRA": "openpi_merge_plugin.lora_configs",
    "inspect_checkpoint": "openpi_merge_plugin.inspection",
    "merge_checkpoint": "openpi_merge_plugin.api",
    "merge_params": "openpi_merge_plugin.engine",
    "verify_merged": "openpi_merge_plugin.integrity",
}
__all__ = [
    "ExpertLoRA",
    "LoRASource",
    "LoRASpec",
    "MergeError",
    "MergeOptions",
    "ResolvedLoRA",
    "inspect_checkpoint",
    "merge_checkpoint",
    "merge_params",
    "verify_merged",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openpi_merge_plugin' has no attribute {name!r}")
