"""gemma variants by structure: what a variant's config is without LoRA, which variant that is, and registering one.

openpi builds each expert from `gemma.get_config(variant)` (pi0, pi0.5) or `gemma_fast.get_config(variant)`
(pi0-FAST): a `gemma.Config` dataclass or an `ml_collections.ConfigDict`. Users add variants of their own, under
any name, by wrapping `get_config`. So the non-LoRA twin of a variant is found from what its config holds, never from
its name: the same config with `lora_configs` removed and every other field identical (the `variant` entry of a
gemma_fast config is its name and is not compared). A registered variant with exactly that config is used if there
is one; otherwise one is registered here, by wrapping `get_config` the way users do.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import typing
from typing import Any

# A variant registered here for the non-LoRA twin of variant V is named V + DERIVED_SUFFIX.
DERIVED_SUFFIX = "_merged"
_NAME_KEY = "variant"  # gemma_fast configs carry their own name
_REGISTRY = "_openpi_merge_plugin_variants"  # on the gemma module: name -> config factory


class VariantError(ValueError):
    """No non-LoRA twin can be registered for a variant."""


def lora_configs(config: Any) -> dict[str, Any]:
    """The variant's LoRA configs ({} when it has none)."""
    found = config.get("lora_configs") if hasattr(config, "to_dict") else getattr(config, "lora_configs", None)
    return {k: v for k, v in dict(found or {}).items() if v is not None}


def without_lora(config: Any, name: str | None = None) -> Any:
    """A copy of a variant's config with no LoRA configs and everything else identical (renamed to `name`)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, lora_configs={})
    copy = config.copy_and_resolve_references()
    if "lora_configs" in copy:
        del copy["lora_configs"]
    if name is not None and _NAME_KEY in copy:
        copy[_NAME_KEY] = name
    return copy


def structure(config: Any) -> dict[str, Any]:
    """Every field of a variant's config that shapes the model (all but its LoRA configs and its own name)."""
    if dataclasses.is_dataclass(config):
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        fields = config.to_dict()
        fields.pop(_NAME_KEY, None)
    fields.pop("lora_configs", None)
    return fields


def registered(module: Any) -> list[str]:
    """The variant names a gemma module declares (its `Variant` literal), in order."""
    return [str(v) for v in typing.get_args(getattr(module, "Variant", None))]


def plain_twin(module: Any, variant: str) -> str:
    """The name of the non-LoRA variant with the same structure as `variant` (registered here if none exists)."""
    config = module.get_config(variant)
    want = structure(config)
    for name in registered(module):
        if name == variant:
            continue
        try:
            candidate = module.get_config(name)
        except Exception:  # a declared name its get_config does not know
            continue
        if not lora_configs(candidate) and _same(structure(candidate), want):
            return name
    name = variant + DERIVED_SUFFIX
    try:
        taken = module.get_config(name)
    except Exception:
        taken = None
    if taken is not None and not _is_derived(module, name):
        if not lora_configs(taken) and _same(structure(taken), want):
            return name
        raise VariantError(
            f"variant {variant!r} has no non-LoRA twin: the name {name!r} is taken by a variant of another structure"
        )
    register(module, name, lambda: without_lora(module.get_config(variant), name))
    return name


def register(module: Any, name: str, make: Callable[[], Any]) -> None:
    """Adds variant `name` to a gemma module: `get_config(name)` returns `make()` (and `Variant` names it)."""
    _registry(module)[name] = make
    if name not in registered(module):
        module.Variant = typing.Literal[(*registered(module), name)]


def _is_derived(module: Any, name: str) -> bool:
    return name in getattr(module, _REGISTRY, {})


def _registry(module: Any) -> dict[str, Callable[[], Any]]:
    """The plugin's variants of `module`, served by a wrapper around its `get_config` (installed once; wrappers users
    add on top later fall through to it for names they do not know)."""
    found = getattr(module, _REGISTRY, None)
    if found is not None:
        return found
    variants: dict[str, Callable[[], Any]] = {}
    original = module.get_config

    @functools.wraps(original)
    def get_config(variant: str) -> Any:
        if variant in variants:
            return variants[variant]()
        return original(variant)

    module.get_config = get_config
    setattr(module, _REGISTRY, variants)
    return variants


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    try:
        return bool(a == b)
    except Exception:  # fields whose == is not a bool (arrays)
        return False
