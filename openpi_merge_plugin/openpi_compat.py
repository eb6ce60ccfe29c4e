"""Everything that imports openpi. The rest of the package works without it."""

from __future__ import annotations

from typing import Any

from openpi_merge_plugin import serving
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora_configs import ResolvedLoRA
from openpi_merge_plugin.lora_spec import ExpertLoRA
from openpi_merge_plugin.lora_spec import LoRASpec


def openpi_available() -> bool:
    try:
        import openpi.training.config  # noqa: F401
    except ImportError:
        return False
    return True


def model_variants(model: Any) -> tuple[list[str], Any]:
    """The gemma variants of a model config (one per expert) and the `get_config` that resolves them."""
    if hasattr(model, "action_expert_variant"):  # pi0, pi0.5: two experts in openpi.models.gemma
        from openpi.models import gemma

        return [model.paligemma_variant, model.action_expert_variant], gemma.get_config
    if hasattr(model, "paligemma_variant"):  # pi0-FAST: one expert in openpi.models.gemma_fast
        from openpi.models import gemma_fast

        return [model.paligemma_variant], gemma_fast.get_config
    raise ConfigError(
        f"model config {type(model).__name__} has no gemma variants; the merge supports pi0/pi0.5/pi0-FAST"
    )


def lora_from_model(model: Any, *, config_name: str | None = None) -> ResolvedLoRA:
    """Reads `lora_configs` of each expert's live gemma config, so user-defined variants work."""
    variants, get_config = model_variants(model)
    experts = {}
    for i, variant in enumerate(variants):
        lora_configs = getattr(get_config(variant), "lora_configs", None) or {}
        specs = {k: LoRASpec.from_openpi(lora_configs[k]) for k in ("attn", "ffn") if lora_configs.get(k) is not None}
        experts[i] = ExpertLoRA(variant, **specs)
    return ResolvedLoRA(
        experts=experts,
        source=f"openpi config {config_name}" if config_name else f"openpi model {type(model).__name__}",
        config_name=config_name,
        serving_config=serving.serving_config_name(config_name) if config_name else None,
    )


def lora_from_train_config(name: str) -> ResolvedLoRA:
    """`--config NAME`: resolves a registered openpi TrainConfig."""
    try:
        import openpi.training.config as _config
    except ImportError as e:
        raise ConfigError(f"--config {name} needs openpi importable in this environment ({e})") from e
    try:
        train_config = _config.get_config(name)
    except ValueError as e:
        raise ConfigError(f"--config {name}: {e}") from e
    return lora_from_model(train_config.model, config_name=name)
