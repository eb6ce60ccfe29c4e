"""Merge openpi LoRA adapters into serving-ready checkpoints, with openpi's exact runtime semantics.

Public API (imported lazily, so that importing the package, as openpi's start-up hook does, stays cheap):

    merge_checkpoint(step_dir, lora=LoRASource(...), options=MergeOptions(...), output=None, overwrite=False)
        Merge a LoRA step on disk into <step>/merged (streamed, verified, atomic); returns output, report, manifest.
    read_lora_step(step_dir, lora=LoRASource(...)) -> LoRAStep(params, lora)
        A LoRA step's params (nested dict) and its resolved LoRA config, in memory.
    merge_params(params, resolved_lora, MergeOptions(...)) -> MergeResult(params, report)
        Merge an in-memory params tree.
    verify_merged(merged_dir) -> VerifyResult        re-check a merged checkpoint (ok, problems, to_json()).
    inspect_checkpoint(path, lora=LoRASource(...))   what a LoRA step or merged checkpoint holds (to_json()).
    export(src, "pytorch" | "lerobot", options=ExportOptions(...), config=None, lora=None, output=None)
        openpi's PyTorch checkpoint, or LeRobot 0.6.1's policy directory, of any openpi checkpoint (a LoRA step,
        merged on the way; a merged, fine-tuned or released checkpoint, as it is); returns output, manifest.
    ExportOptions(precision=, action_horizon=, max_token_len=, model_dtype=, norm_stats=, ...)   how to export.
    LoRASource(config=, lora_config=, alpha=, rslora=)   where the LoRA config comes from.
    MergeOptions(output_dtype=, strength=, verify=, tolerance=, allow_nonfinite=, seed=)   how to merge.
    LoRASpec, ExpertLoRA, ResolvedLoRA               LoRA configs as openpi defines them.
    MergeError                                       every error meant for the user (its message says what to do).
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
    "LoRASource": "openpi_merge_plugin.lora.configs",
    "LoRASpec": "openpi_merge_plugin.lora.spec",
    "MergeError": "openpi_merge_plugin.errors",
    "MergeOptions": "openpi_merge_plugin.options",
    "ExportOptions": "openpi_merge_plugin.formats.base",
    "export": "openpi_merge_plugin.pipeline.export",
    "read_lora_step": "openpi_merge_plugin.pipeline.checkpoint_merge",
    "ResolvedLoRA": "openpi_merge_plugin.lora.configs",
    "inspect_checkpoint": "openpi_merge_plugin.checks.inspection",
    "merge_checkpoint": "openpi_merge_plugin.pipeline.checkpoint_merge",
    "merge_params": "openpi_merge_plugin.merge.engine",
    "verify_merged": "openpi_merge_plugin.checks.integrity",
}
__all__ = [
    "ExpertLoRA",
    "ExportOptions",
    "LoRASource",
    "LoRASpec",
    "MergeError",
    "MergeOptions",
    "ResolvedLoRA",
    "export",
    "inspect_checkpoint",
    "merge_checkpoint",
    "merge_params",
    "read_lora_step",
    "verify_merged",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openpi_merge_plugin' has no attribute {name!r}")
