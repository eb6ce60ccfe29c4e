"""Serving configs: for a LoRA train config NAME, `get_config("NAME_merged")` is its non-LoRA twin.

The twin is found by structure (`variants`): each expert whose gemma variant has LoRA configs gets the variant with
the same config minus its LoRA (a registered one if there is one, else one registered here); nothing else of the
train config changes but its name, the freeze filter (none) and merging (off). Resolved on lookup rather than
registered up front, so that it also works for train configs and variants that users add after openpi's import,
and in a fresh process (`scripts/serve_policy.py`).

A merge records the serving config only after checking, in its own process, that `get_config` resolves it and that
the model it builds has every param the merged checkpoint must provide, with the same shape; otherwise the
manifest says why there is none.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any

import openpi_merge_plugin
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.serving import names as serving
from openpi_merge_plugin.serving import variants
from openpi_merge_plugin.serving.names import ServingConfig


@dataclasses.dataclass(frozen=True)
class Twin:
    """The serving twin of a train config, or why there is none."""

    config: Any | None
    reason: str | None = None


def serving_twin(train_config: Any) -> Twin:
    """The same config with each LoRA variant replaced by its non-LoRA twin, no freeze filter and no merge."""
    import flax.nnx as nnx

    from openpi_merge_plugin.lora import openpi_configs

    model = train_config.model
    try:
        fields, module = openpi_configs.model_variants(model)
    except ConfigError as e:
        return Twin(None, f"config {train_config.name}: {e}")
    plain = {}
    for field in fields:
        variant = getattr(model, field)
        try:
            if variants.lora_configs(module.get_config(variant)):
                plain[field] = variants.plain_twin(module, variant)
        except Exception as e:  # the variant itself does not resolve, or its twin cannot be registered
            return Twin(None, f"config {train_config.name}: {field} {variant!r}: {e}")
    if not plain:
        used = ", ".join(f"{f}={getattr(model, f)!r}" for f in fields)
        return Twin(None, f"config {train_config.name} uses no LoRA variant ({used}); serve it under its own name")
    changes: dict[str, Any] = {
        "name": serving.serving_config_name(train_config.name),
        "model": dataclasses.replace(model, **plain),
        "freeze_filter": nnx.Nothing(),
    }
    if hasattr(train_config, "merge_lora_on_save"):
        changes["merge_lora_on_save"] = False
    return Twin(dataclasses.replace(train_config, **changes))


def check(config_name: str, structure: Mapping[str, ShapeDtype], run_config: Any | None = None) -> ServingConfig:
    """The serving config of a merge of train config `config_name`, checked to resolve and to load `structure`.

    `run_config`: the TrainConfig the checkpoint was trained with when it may differ from the registered one
    (a run's command-line overrides); its twin must be the registered name's.
    """
    name = serving.serving_config_name(config_name)
    try:
        import openpi.training.config as _config
    except ImportError as e:
        return ServingConfig(None, f"openpi is not importable here ({e}), so {name} could not be checked")
    try:
        twin = _config.get_config(name)
    except ValueError as e:
        off = (
            f" (the plugin is switched off: {openpi_merge_plugin.DISABLE_ENV} is set)"
            if openpi_merge_plugin.disabled()
            else ""
        )
        return ServingConfig(None, f"get_config({name!r}) fails{off}: {e}")
    if run_config is not None:
        expected = serving_twin(run_config)
        if expected.config is None:
            return ServingConfig(None, expected.reason)
        if expected.config.model != twin.model:
            return ServingConfig(
                None,
                f"{name} is the twin of the registered config {config_name}, whose model differs from this run's "
                f"(overridden on the command line?): {twin.model} vs {expected.config.model}",
            )
    if problem := load_problem(twin.model, structure):
        return ServingConfig(None, f"{name} cannot load the merged params: {problem}")
    return ServingConfig(name)


def load_problem(model: Any, structure: Mapping[str, ShapeDtype]) -> str | None:
    """Why `model.load` (openpi's `BaseModelConfig.load`) would reject params of this structure; None if it won't.

    `load` keeps the checkpoint's params that the model has and requires every param of the model, with its shape.
    """
    want = _abstract_params(model)
    missing = sorted(set(want) - set(structure))
    wrong = sorted(p for p in want if p in structure and tuple(structure[p].shape) != want[p])
    if not (missing or wrong):
        return None
    parts = []
    if missing:
        parts.append(f"{len(missing)} params of the model are not in the checkpoint, e.g. {missing[:3]}")
    if wrong:
        parts.append(
            f"{len(wrong)} params have other shapes, e.g. {wrong[0]}: model {list(want[wrong[0]])}, "
            f"checkpoint {list(structure[wrong[0]].shape)}"
        )
    return "; ".join(parts)


def _abstract_params(model: Any) -> dict[str, tuple[int, ...]]:
    return dict(_abstract_params_cached(_Key(model)))


@dataclasses.dataclass(frozen=True)
class _Key:
    """Caches by the model config's value (openpi's model configs may hold dicts, so they are not hashable)."""

    model: Any

    def __hash__(self) -> int:
        return hash(repr(self.model))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Key) and repr(self.model) == repr(other.model) and self.model == other.model


@functools.lru_cache(maxsize=8)
def _abstract_params_cached(key: _Key) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import flax.nnx as nnx
    import jax

    from openpi_merge_plugin.checkpoint import sources

    _, state = nnx.split(nnx.eval_shape(key.model.create, jax.random.key(0)))
    flat = sources.flatten(sources.pure_dict(state))
    return tuple((p, tuple(int(d) for d in x.shape)) for p, x in flat.items())


def patch_get_config(module: Any) -> None:
    """Wraps openpi's `get_config` so that serving names resolve (other names behave exactly as before)."""
    original = module.get_config
    if getattr(original, "openpi_merge_plugin_patched", False):
        return

    @functools.wraps(original)
    def get_config(config_name: str) -> Any:
        try:
            return original(config_name)
        except ValueError as e:
            base = module._CONFIGS_DICT.get(config_name.removesuffix(serving.SERVING_SUFFIX))  # noqa: SLF001
            if not config_name.endswith(serving.SERVING_SUFFIX) or base is None:
                raise
            twin = serving_twin(base)
            if twin.config is None:
                raise ValueError(f"{str(e).rstrip()} No serving twin: {twin.reason}") from None
            return twin.config

    get_config.openpi_merge_plugin_patched = True  # type: ignore[attr-defined]
    module.get_config = get_config
