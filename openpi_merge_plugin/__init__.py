"""Merge openpi LoRA adapters into serving-ready checkpoints, with openpi's exact runtime semantics."""

__version__ = "0.1.0"

from openpi_merge_plugin.api import LoRASource  # noqa: E402
from openpi_merge_plugin.api import merge_checkpoint  # noqa: E402
from openpi_merge_plugin.engine import MergeOptions  # noqa: E402
from openpi_merge_plugin.engine import merge_params  # noqa: E402
from openpi_merge_plugin.errors import MergeError  # noqa: E402
from openpi_merge_plugin.lora_configs import ResolvedLoRA  # noqa: E402
from openpi_merge_plugin.lora_spec import ExpertLoRA  # noqa: E402
from openpi_merge_plugin.lora_spec import LoRASpec  # noqa: E402

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
