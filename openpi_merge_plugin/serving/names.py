"""Serving configs of merged checkpoints: the non-LoRA twin of train config NAME is looked up as NAME + SUFFIX."""

from __future__ import annotations

import dataclasses
from typing import Any

SERVING_SUFFIX = "_merged"


def serving_config_name(train_config_name: str) -> str:
    return f"{train_config_name}{SERVING_SUFFIX}"


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """The openpi config that serves a merged checkpoint (checked to resolve and to load it), or why there is none."""

    name: str | None
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"serving_config": self.name, "serving_config_reason": self.reason}

    def describe(self) -> str:
        """One line for the terminal and the training log."""
        return f"serve with config {self.name}" if self.name else f"no serving config: {self.reason}"


def without_openpi_config(lora_source: str) -> ServingConfig:
    return ServingConfig(
        None,
        f"the LoRA config came from {lora_source}, not from a registered openpi TrainConfig; merge with "
        "--config NAME to get a serving config, or serve with a non-LoRA config of your own",
    )
