"""What an export needs to know of the model beyond its params: the action horizon, the prompt's token length,
`Pi0Config.dtype`, the variant names, the norm stats. pi0 / pi0.5 / pi0-FAST and every dim come from the params.

Each fact comes from the first of:
1. an openpi config: `--config NAME` (or the TrainConfig of a run, for merge on save), else the config the merge's
   record names, when no option below is given (its model config says them all);
2. the options (`--action-horizon`, `--max-token-len`, `--model-dtype`);
3. openpi's defaults for the model the params are (Pi0Config / Pi0FASTConfig), said in the options' help.
The config is read, never built: its model config's fields and its data config's `assets.asset_id` / `repo_id` (as
openpi's `create_base_config` takes them), without `data.create(...)`, which builds the transforms and so the
tokenizer (a download).

Norm stats: `--norm-stats FILE`; else `assets/<--asset-id>/norm_stats.json`; else the config's asset_id's, where
the checkpoint has them; else the only norm stats in its `assets/`. A checkpoint without any (a base) exports for a
format that needs none; a format that needs them says which option to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import pathlib
from typing import Any, TypeVar

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import tensors
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.formats.base import ModelFacts
from openpi_merge_plugin.lora import openpi_configs

T = TypeVar("T")

# openpi 15a9616's model config defaults: Pi0Config (pi0, pi0.5: max_token_len 200 if pi05 else 48) and
# Pi0FASTConfig.
OPENPI_DEFAULTS: dict[tensors.Kind, dict[str, Any]] = {
    "pi0": {"action_horizon": 50, "max_token_len": 48, "model_dtype": "bfloat16"},
    "pi05": {"action_horizon": 50, "max_token_len": 200, "model_dtype": "bfloat16"},
    "pi0_fast": {"action_horizon": 32, "max_token_len": 250, "model_dtype": "bfloat16"},
}
NORM_STATS = "norm_stats.json"


def resolve(
    structure: Mapping[str, Any],
    record: Mapping[str, Any],
    assets: pathlib.Path | None,
    *,
    config: str | Any | None,
    options: ExportOptions,
) -> ModelFacts:
    """The model facts of params with this structure: `config` (a registered name, or a live TrainConfig), else the
    openpi config `record` names (a merge's manifest) when no option says the model, else the options, else
    openpi's defaults."""
    kind = _kind(structure)
    given = options.model_options
    if config is not None and given:
        raise ConfigError(f"--config and --{'/--'.join(f.replace('_', '-') for f in given)} are alternatives: give one")
    if config is not None:
        facts = from_train_config(openpi_configs.train_config(config) if isinstance(config, str) else config, config)
    elif not given and _recorded_names(record):
        facts = from_recorded_config(record)
    else:
        facts = from_options(kind, record, structure, given)
    _check_model(facts, kind, structure)
    return with_norm_stats(facts, assets, options)


def _kind(structure: Mapping[str, Any]) -> tensors.Kind:
    try:
        return tensors.detect_kind(structure)
    except tensors.LayoutError as e:
        raise ConfigError(f"not an openpi pi0 / pi0.5 / pi0-FAST params tree: {e}") from e


def from_train_config(config: Any, name: str | Any | None = None) -> ModelFacts:
    """From an openpi TrainConfig, read and not built: its model config, and its data config's asset_id."""
    name = name if isinstance(name, str) else getattr(config, "name", None)
    model = config.model
    fields = openpi_configs.variant_fields(model)
    fast = len(fields) == 1
    origin = f"openpi config {name}" if name else "the openpi config"
    return ModelFacts(
        action_horizon=int(model.action_horizon),
        max_token_len=int(model.max_token_len),
        model_dtype=str(model.dtype),
        variants=tuple(str(getattr(model, f)) for f in fields),
        action_dim=int(model.action_dim) if fast else None,
        pi05=bool(getattr(model, "pi05", False)) if not fast else None,
        config_name=name,
        asset_id=asset_id(getattr(config, "data", None)),
        origin={"model": origin},
    )


def asset_id(data: Any) -> str | None:
    """A data config factory's asset_id as openpi's `create_base_config` takes it (`assets.asset_id or repo_id`),
    from its fields: nothing is built. None where it names none (a data config of its own may set another in its
    `create`; the only norm stats in the checkpoint are then taken, or --asset-id)."""
    assets, repo_id = getattr(data, "assets", None), getattr(data, "repo_id", None)
    found = getattr(assets, "asset_id", None) or repo_id
    return found if isinstance(found, str) and found else None


def from_openpi(config_name: str) -> ModelFacts:
    """The facts of a registered openpi TrainConfig."""
    return from_train_config(
        openpi_configs.train_config(config_name, without="; or pass --action-horizon"), config_name
    )


def _recorded_names(record: Mapping[str, Any]) -> list[str]:
    """The openpi configs a merge's record names: its serving config (LoRA-free), else its LoRA config's."""
    return list(filter(None, [record.get("serving_config"), (record.get("lora_config") or {}).get("config_name")]))


def from_recorded_config(record: Mapping[str, Any], build: Callable[[str], T] = from_openpi) -> T:
    """`build(name)` for the first openpi config the record names that builds; else one error naming why each
    failed and the options to pass instead."""
    problems = []
    for name in _recorded_names(record):
        try:
            return build(name)
        except ConfigError as e:
            problems.append(str(e))
    why = "; ".join(problems) or "the manifest names no openpi config"
    raise ConfigError(
        f"the export needs the model config (action_horizon, max_token_len, dtype) and cannot get it: {why}. Pass "
        "--config NAME with openpi importable, or --action-horizon N (the rest then are openpi's defaults)"
    )


def from_options(
    kind: tensors.Kind, record: Mapping[str, Any], structure: Mapping[str, Any], given: Mapping[str, Any]
) -> ModelFacts:
    """The options given, openpi's defaults for the rest. The variant names are those the merge's record gives
    each expert, else the openpi variant with the params' dims, else "custom"."""
    defaults = OPENPI_DEFAULTS[kind]
    values = {f: given.get(f, default) for f, default in defaults.items()}
    origin = {
        f: f"--{f.replace('_', '-')}" if f in given else f"openpi's default for {_NAMES[kind]}: {values[f]}"
        for f in defaults
    }
    recorded = (record.get("lora_config") or {}).get("experts") or {}
    n_experts = 1 if kind == "pi0_fast" else 2
    variants = []
    for i, suffix in enumerate(("", "_1")[:n_experts]):
        name = (recorded.get(str(i)) or {}).get("variant") if recorded else None
        if name is None:
            name = tensors.variant_of(tensors.dims_from_params(structure, suffix)) or "custom"
            origin[f"variant_{i}"] = "the params' dims"
        variants.append(name)
    return ModelFacts(**values, variants=tuple(variants), origin=origin)


def _check_model(facts: ModelFacts, kind: tensors.Kind, structure: Mapping[str, Any]) -> None:
    """A config must describe the params: the same model, and (with openpi here) its variants' dims."""
    if "model" not in facts.origin:  # not from a config: nothing to check against
        return
    config_kind = "pi0_fast" if facts.action_dim is not None else "pi05" if facts.pi05 else "pi0"
    if config_kind != kind:
        raise ConfigError(f"the params are {_NAMES[kind]}'s, but {facts.origin['model']} is {_NAMES[config_kind]}")
    if kind == "pi0_fast":
        return
    try:
        from openpi.models import gemma
    except ImportError:
        return
    for variant, suffix in zip(facts.variants, ("", "_1"), strict=True):
        try:
            want = tensors.GemmaDims.of(gemma.get_config(variant))
        except Exception:  # an unknown variant name (e.g. taken from a manifest): the params decide
            continue
        dims = tensors.dims_from_params(structure, suffix)
        if want != dims:
            raise ConfigError(f"variant {variant!r} has dims {want}, but the params have {dims}")


_NAMES = {"pi0": "pi0", "pi05": "pi0.5", "pi0_fast": "pi0-FAST"}


def with_norm_stats(facts: ModelFacts, assets: pathlib.Path | None, options: ExportOptions) -> ModelFacts:
    path, missing = find_norm_stats(assets, options, facts.asset_id)
    chosen = options.norm_stats is None and options.asset_id is None and path is not None
    note = ""
    if chosen and facts.asset_id is not None and path.parent.name != facts.asset_id:
        note = (
            f"the config's asset_id {facts.asset_id!r} has no norm stats in {assets}; taking the only ones there, "
            f"{path.parent.name}"
        )
    return dataclasses.replace(facts, norm_stats=path, norm_stats_missing=missing, norm_stats_note=note)


def find_norm_stats(
    assets: pathlib.Path | None, options: ExportOptions, config_asset_id: str | None
) -> tuple[pathlib.Path | None, str]:
    """(openpi's norm_stats.json of the model or None, why there is none). Explicit choices must exist."""
    if options.norm_stats is not None:
        return pathlib.Path(options.norm_stats).resolve(), ""
    if options.asset_id is not None:
        path = assets / options.asset_id / NORM_STATS if assets is not None else None
        if path is None or not path.is_file():
            raise ConfigError(f"no norm stats for asset_id {options.asset_id!r}: {path} is not a file")
        return path, ""
    found = sorted(assets.glob(f"*/{NORM_STATS}")) if assets is not None and assets.is_dir() else []
    by_id = {p.parent.name: p for p in found}
    if config_asset_id in by_id:
        return by_id[config_asset_id], ""
    if len(found) == 1:
        return found[0], ""  # under another id than the config's: with_norm_stats notes it
    if assets is None or not assets.is_dir():
        where = "the checkpoint has no assets/" if assets is None else f"{assets} does not exist"
        return None, f"the export needs the model's norm stats, and {where}: pass --norm-stats FILE"
    where = str(assets)
    if found:
        listed = ", ".join(by_id)
        return None, (
            f"the export needs the model's norm stats, and {where} has {len(found)} ({listed}): pass --asset-id NAME "
            "(openpi's data config asset_id)"
        )
    return None, f"the export needs the model's norm stats, and {where} has none: pass --norm-stats FILE"
