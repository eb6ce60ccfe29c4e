"""Merge openpi LoRA adapters into serving-ready checkpoints, with openpi's exact runtime semantics.

The public names are imported lazily, so that importing the package (as openpi's startup hook does) stays cheap.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"
# Set (to anything but "", 0, false, no) to keep the plugin out of openpi (see bootstrap).
DISABLE_ENV = "OPENPI_MERGE_PLUGIN_DISABLE"


def disabled() -> bool:
    """Whether DISABLE_ENV switches the plugin off in this process."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


_EXPORTS = {
    "ExpertLoRA": "openpi_merge_plugin.lora.spec",
    "LoRASource": "openpi_merge_plugin.pipeline.checkpoint_merge",
    "LoRASpec": "openpi_merge_plugin.lora.spec",
    "MergeError": "openpi_merge_plugin.errors",
    "MergeOptions": "openpi_merge_plugin.merge.engine",
    "ResolvedLoRA": "openpi_merge_plugin.lora.configs",
    "inspect_checkpoint": "openpi_merge_plugin.checks.inspection",
    "merge_checkpoint": "openpi_merge_plugin.pipeline.checkpoint_merge",
    "merge_params": "openpi_merge_plugin.merge.engine",
    "verify_merged": "openpi_merge_plugin.checks.integrity",
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
