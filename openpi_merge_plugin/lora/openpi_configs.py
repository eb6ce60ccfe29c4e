"""LoRA configs read from openpi itself: the live gemma configs of a model config, or of a registered TrainConfig.

openpi is imported only inside these functions; everything else in `lora/` works without it.
"""

from __future__ import annotations

from typing import Any

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora.spec import ExpertLoRA
from openpi_merge_plugin.lora.spec import LoRASpec
from openpi_merge_plugin.lora.spec import ResolvedLoRA


def openpi_available() -> bool:
    try:
        import openpi.training.config  # noqa: F401
    except ImportError:
        return False
    return True


def variant_fields(model: Any) -> tuple[str, ...]:
    """The model config's gemma variant fields, one per expert, in expert order (nothing imported).

    Told apart by the fields the model config has, as openpi builds them: pi0 / pi0.5 carry two experts of
    `openpi.models.gemma`, pi0-FAST one of `openpi.models.gemma_fast`.
    """
    if hasattr(model, "action_expert_variant"):
        return ("paligemma_variant", "action_expert_variant")
    if hasattr(model, "paligemma_variant"):
        return ("paligemma_variant",)
    raise ConfigError(
        f"model config {type(model).__name__} has no gemma variants; the merge supports pi0/pi0.5/pi0-FAST"
    )


def model_variants(model: Any) -> tuple[tuple[str, ...], Any]:
    """The model config's gemma variant fields (`variant_fields`) and the gemma module they name."""
    fields = variant_fields(model)
    if len(fields) == 2:
        from openpi.models import gemma

        return fields, gemma
    from openpi.models import gemma_fast

    return fields, gemma_fast


def lora_from_model(model: Any, *, config_name: str | None = None) -> ResolvedLoRA:
    """Reads `lora_configs` of each expert's live gemma config, so user-defined variants work."""
    fields, module = model_variants(model)
    experts = {}
    for i, field in enumerate(fields):
        variant = getattr(model, field)
        lora_configs = getattr(module.get_config(variant), "lora_configs", None) or {}
        specs = {k: LoRASpec.from_openpi(lora_configs[k]) for k in ("attn", "ffn") if lora_configs.get(k) is not None}
        experts[i] = ExpertLoRA(variant, **specs)
    return ResolvedLoRA(
        experts=experts,
        source=f"openpi config {config_name}" if config_name else f"openpi model {type(model).__name__}",
        config_name=config_name,
    )


def train_config(name: str, *, without: str = "") -> Any:
    """The registered openpi TrainConfig `name`; a ConfigError if openpi is missing (`without`: what to do then)."""
    try:
        import openpi.training.config as _config
    except ImportError as e:
        raise ConfigError(f"--config {name} needs openpi importable in this environment ({e}){without}") from e
    try:
        return _config.get_config(name)
    except ValueError as e:
        raise ConfigError(f"--config {name}: {e}") from e


def lora_from_train_config(name: str) -> ResolvedLoRA:
    """`--config NAME`: resolves a registered openpi TrainConfig."""
    return lora_from_model(train_config(name).model, config_name=name)
