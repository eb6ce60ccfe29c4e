"""The openpi glue: patches applied to openpi's own modules as they are imported (see `bootstrap`).

    openpi.models.gemma           + the `dummy_lora` variant used by the smoke-test configs
    openpi.models.gemma_fast      + the `dummy_fast_lora` variant used by the pi0-FAST smoke-test config
    openpi.training.config        + TrainConfig fields (source-level, before the config list is built),
                                    serving configs resolved by `get_config`, the configs shipped in configs/
    openpi.training.data_loader   remembers which TrainConfig each data loader was made for
    openpi.training.checkpoints   + a `merged` item on openpi's CheckpointManager, filled by `save_state`

Each patch checks that openpi still looks as expected; if not, that module stays as openpi wrote it and the
plugin says once, in the log, what is inactive and why. Only this layer knows openpi's internals; it calls the
engine and knows nothing of the merge math.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import importlib
import logging
from typing import Any

logger = logging.getLogger("openpi_merge_plugin")


@dataclasses.dataclass(frozen=True)
class Patch:
    # (source bytes, path) -> code object, or None to compile the source unchanged.
    transform_source: Callable[[bytes, str], Any] | None = None
    # Called with the module once its body has run.
    after_import: Callable[[Any], None] | None = None


def _lazy(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        try:
            return getattr(importlib.import_module(f"openpi_merge_plugin.openpi_glue.{module}"), name)(*args)
        except Exception as e:  # a plugin bug must not stop openpi from importing
            inactive(f"patching with {module}.{name} failed ({type(e).__name__}: {e})")
            return None

    return call


PATCHES: dict[str, Patch] = {
    "openpi.models.gemma": Patch(after_import=_lazy("shipped_configs", "add_dummy_lora_variant")),
    "openpi.models.gemma_fast": Patch(after_import=_lazy("shipped_configs", "add_dummy_fast_lora_variant")),
    "openpi.training.config": Patch(
        transform_source=_lazy("config_fields", "transform_source"),
        after_import=_lazy("config_fields", "after_import"),
    ),
    "openpi.training.data_loader": Patch(after_import=_lazy("save_hook", "patch_data_loader")),
    "openpi.training.checkpoints": Patch(after_import=_lazy("save_hook", "patch_checkpoints")),
}

_reported: set[str] = set()


def inactive(reason: str) -> None:
    """Says once, loudly, that (part of) the plugin does nothing in this process, and why."""
    if reason not in _reported:
        _reported.add(reason)
        logger.warning("openpi-merge-plugin inactive: %s", reason)
