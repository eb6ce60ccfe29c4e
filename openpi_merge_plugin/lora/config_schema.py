"""The schema of LoRA config files (`--lora-config`) and of the LoRA config a manifest records: every key known, every
value checked, nothing defaulted into a different model.

A file (like configs/lora_tiny_fixture.json)::

    {"experts": [EXPERT, ...],      # required: one per gemma expert, in order (0: PaliGemma, 1: the action expert)
     "config_name": str | null,     # optional: the openpi TrainConfig it describes
     "description": str}            # optional: free text
    EXPERT = {"variant": str,       # optional: the gemma variant's name (a label; "custom" if absent)
              "attn": SPEC | null, "ffn": SPEC | null}   # both required: null is "no LoRA there"
    SPEC = {"rank": int > 0, "alpha": number > 0,         # both required: openpi records neither in a checkpoint
            "rslora": bool, "axes": [int, int], "label": str,   # optional: openpi's LoRAConfig defaults
            "scaling_value": number}                             # optional: must be what rank, alpha and rslora give

A manifest's record (`ResolvedLoRA.to_json`) is the same with "experts" an object keyed "0", "1", ... and every
field present. A duplicated key, an unknown key at any level, a missing alpha, a scaling_value that contradicts
rank/alpha/rslora are refused. Against the checkpoint (`check_against`): no expert or kind the checkpoint has no
adapters for (ranks and missing configs are the adapter pairing's to refuse).
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import math
import pathlib
from typing import Any

from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora.spec import ExpertLoRA
from openpi_merge_plugin.lora.spec import LoRASpec
from openpi_merge_plugin.lora.spec import ResolvedLoRA
from openpi_merge_plugin.options import OptionError

FILE_KEYS = {"experts": True, "config_name": False, "description": False}  # key -> required
RECORD_KEYS = {"source": True, "config_name": True, "experts": True}
EXPERT_KEYS = {"variant": False, "attn": True, "ffn": True}
SPEC_KEYS = {"rank": True, "alpha": True, "rslora": False, "axes": False, "label": False, "scaling_value": False}
RECORDED_SPEC_KEYS = dict.fromkeys(SPEC_KEYS, True)
KINDS = ("attn", "ffn")
_SCALING_RTOL = 1e-6


class SchemaError(ValueError):
    """What is wrong, and where (`experts[0].attn.alpha`)."""


def read_file(path: pathlib.Path) -> tuple[dict[int, ExpertLoRA], str | None]:
    """The experts and config name of a LoRA config file; a ConfigError naming the file and the key at fault."""
    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=_no_duplicates)
    except FileNotFoundError as e:
        raise ConfigError(f"LoRA config file {path} does not exist") from e
    except IsADirectoryError as e:
        raise ConfigError(f"LoRA config file {path} is a directory, not a JSON file") from e
    except (SchemaError, ValueError) as e:  # json's and ours (a duplicated key)
        raise ConfigError(f"LoRA config file {path} is not valid JSON: {e}") from e
    try:
        _keys(data, FILE_KEYS, "the file")
        config_name = _optional_text(data.get("config_name"), "config_name")
        if "description" in data and not isinstance(data["description"], str):
            raise SchemaError(f"description must be a string, got {data['description']!r}")
        experts = data["experts"]
        if not isinstance(experts, list) or not experts:
            raise SchemaError(f"experts must be a non-empty list (one entry per gemma expert), got {experts!r}")
        parsed = {i: _expert(e, f"experts[{i}]", SPEC_KEYS) for i, e in enumerate(experts)}
    except SchemaError as e:
        raise ConfigError(f"LoRA config file {path}: {e}") from None
    return parsed, config_name


def parse_recorded(data: Any) -> tuple[dict[int, ExpertLoRA], str, str | None]:
    """(experts, source, config name) of a manifest's `lora_config`; a ConfigError if it is not as written."""
    try:
        _keys(data, RECORD_KEYS, "lora_config")
        if not isinstance(data["source"], str):
            raise SchemaError(f"source must be a string, got {data['source']!r}")
        config_name = _optional_text(data["config_name"], "config_name")
        experts = data["experts"]
        if not isinstance(experts, dict) or not experts or not all(k.isdigit() for k in experts):
            raise SchemaError(f"experts must be an object keyed by expert index, got {experts!r}")
        parsed = {int(i): _expert(e, f"experts.{i}", RECORDED_SPEC_KEYS) for i, e in experts.items()}
    except SchemaError as e:
        raise ConfigError(f"recorded LoRA config is malformed: {e}") from None
    return parsed, data["source"], config_name


def read_recorded(data: Any) -> ResolvedLoRA:
    """A manifest's `lora_config` (`ResolvedLoRA.to_json`) read back; a ConfigError if it is not as written."""
    experts, source, config_name = parse_recorded(data)
    return ResolvedLoRA(experts=experts, source=source, config_name=config_name)


def check_against(experts: Mapping[int, ExpertLoRA], tree: Mapping[str, Any], where: str) -> None:
    """Refuses LoRA configs for experts or kinds the checkpoint has no adapters for (a file for another model)."""
    ranks = _adapters.adapter_ranks(tree)
    if not ranks:
        return  # no adapters at all: the adapter pairing says so (nothing to merge)
    n_experts = len(_adapters.expert_widths(tree)) or 1 + max((e for e, _ in ranks), default=0)
    adapted = ", ".join(f"expert {e} {k}" for e, k in sorted(ranks)) or "none"
    if len(experts) > n_experts or max(experts, default=0) >= n_experts:
        raise ConfigError(
            f"{where} gives {len(experts)} experts, the checkpoint has {n_experts} (adapters: {adapted}): a config of "
            "another model?"
        )
    for index, expert in sorted(experts.items()):
        for kind in KINDS:
            if expert.get(kind) is not None and (index, kind) not in ranks:
                raise ConfigError(
                    f"{where} gives expert {index} an {kind} LoRA config, but the checkpoint has no {kind} adapters "
                    f"on expert {index} (adapters: {adapted}): a config of another model?"
                )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if duplicated := sorted({k for k in keys if keys.count(k) > 1}):
        raise SchemaError(f"key {duplicated[0]!r} appears twice in one object (which one counts?)")
    return dict(pairs)


def _keys(data: Any, allowed: Mapping[str, bool], where: str) -> None:
    if not isinstance(data, dict):
        raise SchemaError(f"{where} must be an object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        hint = "; alpha and rank belong inside attn/ffn" if {"alpha", "rank"} & set(unknown) else ""
        raise SchemaError(
            f"{where} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(allowed)}){hint}"
        )
    missing = [k for k, required in allowed.items() if required and k not in data]
    if missing:
        raise SchemaError(f"{where} has no {missing[0]!r}{_why_required(missing[0])}")


def _why_required(key: str) -> str:
    if key == "alpha":
        return (
            " (openpi's LoRAConfig defaults it to 1.0, which silently scales the adapters differently from most "
            'trainings: write "alpha": 1.0 if that is what was trained)'
        )
    if key in KINDS:
        return f' (write "{key}": null if the expert has no {key} LoRA)'
    return ""


def _optional_text(value: Any, where: str) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise SchemaError(f"{where} must be a non-empty string or null, got {value!r}")
    return value


def _expert(data: Any, where: str, spec_keys: Mapping[str, bool]) -> ExpertLoRA:
    _keys(data, EXPERT_KEYS if spec_keys is SPEC_KEYS else dict.fromkeys(EXPERT_KEYS, True), where)
    variant = data.get("variant", "custom")
    if not isinstance(variant, str) or not variant:
        raise SchemaError(f"{where}.variant must be a non-empty string, got {variant!r}")
    specs = {k: _spec(data[k], f"{where}.{k}", spec_keys) for k in KINDS if data[k] is not None}
    return ExpertLoRA(variant, **specs)


def _spec(data: Any, where: str, keys: Mapping[str, bool]) -> LoRASpec:
    _keys(data, keys, where)
    alpha = data["alpha"]
    fields = {
        "rank": data["rank"],  # not coerced: a rank of 4.5 or "4" is an error, not 4
        "alpha": float(alpha) if isinstance(alpha, int) and not isinstance(alpha, bool) else alpha,
        "rslora": data.get("rslora", False),
        "axes": tuple(data["axes"]) if isinstance(data.get("axes"), list) else data.get("axes", (-2, -1)),
        "label": data.get("label", "L"),
    }
    try:
        spec = LoRASpec(**fields)
    except OptionError as e:
        raise SchemaError(f"{where}.{e.option} {e.problem}") from None
    if "scaling_value" in data:
        given = data["scaling_value"]
        if (
            not isinstance(given, int | float)
            or isinstance(given, bool)
            or not math.isclose(given, spec.scaling_value, rel_tol=_SCALING_RTOL)
        ):
            formula = "alpha / sqrt(rank)" if spec.rslora else "alpha / rank"
            raise SchemaError(
                f"{where}.scaling_value {given!r} contradicts rank {spec.rank}, alpha {spec.alpha:g} and rslora "
                f"{str(spec.rslora).lower()} ({formula} = {spec.scaling_value:g}): fix one of them"
            )
    return spec
