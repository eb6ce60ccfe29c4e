"""Merge openpi LoRA adapters into serving-ready checkpoints, with openpi's exact runtime semantics."""

__version__ = "0.1.0"

from openpi_merge_plugin.api import LoRASource
from openpi_merge_plugin.api import merge_checkpoint
from openpi_merge_plugin.engine import MergeOptions
from openpi_merge_plugin.engine import merge_params
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.lora_configs import ResolvedLoRA
from openpi_merge_plugin.lora_spec import ExpertLoRA
from openpi_merge_plugin.lora_spec import LoRASpec

__all__ = [
    "ExpertLoRA",
    "LoRASource",
    "LoRASpec",
    "MergeError",
    "MergeOptions",
    "ResolvedLoRA",
    "merge_checkpoint",
    "merge_params",
]
