"""The files beside LeRobot 0.6.1's `model.safetensors`: `config.json` and the pre/post-processors, written without
LeRobot as its own `save_pretrained` writes them (verbatim copies in tests/data/lerobot-0.6.1/saved/ are the check).

- `config.json`: `PreTrainedConfig._save_pretrained` (draccus encoding, `json.dump(indent=4)`): `type`, the base
  fields, then the policy class's fields in declaration order, at LeRobot's defaults except what the openpi model
  decides (`FIELD_ORDER`, `DEFAULTS`).
- `policy_preprocessor.json` / `policy_postprocessor.json` (`PolicyProcessorPipeline.save_pretrained`,
  `json.dump(indent=2)`): the steps of `make_pi0/pi05/pi0_fast_pre_post_processors`.
- one safetensors per normalizing step, `<feature>.<stat>` float32 for every stat given (both files equal).

openpi's norm stats (`assets/<asset_id>/norm_stats.json`: `state`, `actions`) become `observation.state` and
`action`; openpi normalizes with quantiles for every model but pi0 (`use_quantile_norm = model_type != PI0`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from openpi_merge_plugin.formats.tensors import Kind

IMAGE_SHAPE = (3, 224, 224)  # openpi's model image size; LeRobot's image_resolution default (224, 224)
OPENPI_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's IMAGE_KEYS, in model order
IMAGES = "observation.images."
STATE = "observation.state"
ACTION = "action"
OPENPI_STATS = {"state": STATE, "actions": ACTION}  # openpi norm-stats key -> LeRobot feature
STAT_NAMES = ("mean", "std", "q01", "q99")
NEEDED_STATS = {"MEAN_STD": ("mean", "std"), "QUANTILES": ("q01", "q99")}
PREPROCESSOR = "policy_preprocessor"
POSTPROCESSOR = "policy_postprocessor"
TEXT_TOKENIZER = "google/paligemma-3b-pt-224"
ACTION_TOKENIZER = "lerobot/fast-action-tokenizer"

_BASE = ("type", "n_obs_steps", "input_features", "output_features", "device", "use_amp", "use_peft")
_BASE += ("push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path", "pretrained_revision")
_HEAD = ("paligemma_variant", "action_expert_variant", "dtype", "chunk_size", "n_action_steps", "max_state_dim")
_HEAD += ("max_action_dim",)
_FLOW = ("num_inference_steps", "time_sampling_beta_alpha", "time_sampling_beta_beta", "time_sampling_scale")
_FLOW += ("time_sampling_offset", "min_period", "max_period")
_MID = ("use_relative_actions", "relative_exclude_joints", "action_feature_names", "rtc_config", "image_resolution")
_MID += ("empty_cameras",)
_TRAIN = ("gradient_checkpointing", "compile_model", "compile_mode")
_FREEZE = ("freeze_vision_encoder", "train_expert_only")
_OPT = ("optimizer_lr", "optimizer_betas", "optimizer_eps", "optimizer_weight_decay", "optimizer_grad_clip_norm")
_OPT += ("scheduler_warmup_steps", "scheduler_decay_steps", "scheduler_decay_lr")
_FAST = ("max_action_tokens",)
_FAST_TOK = ("text_tokenizer_name", "action_tokenizer_name", "temperature", "max_decoding_steps", "fast_skip_tokens")
_FAST_TOK += ("validate_action_token_prefix", "use_kv_cache")
_NORM, _TOK = ("normalization_mapping",), ("tokenizer_max_length",)
# Declaration order of PI0Config, PI05Config, PI0FastConfig (lerobot/policies/*/configuration_*.py).
FIELD_ORDER: dict[Kind, tuple[str, ...]] = {
    "pi0": _BASE + _HEAD + _FLOW + _MID + _NORM + _TRAIN + _FREEZE + _OPT + _TOK,
    "pi05": _BASE + _HEAD + _FLOW + _MID + _TOK + _NORM + _TRAIN + _FREEZE + _OPT,
    "pi0_fast": _BASE + _HEAD + _FAST + _MID + _TOK + _FAST_TOK + _NORM + _TRAIN + _OPT,
}
# LeRobot 0.6.1's defaults for the fields the export does not set (as draccus encodes them).
DEFAULTS: dict[str, Any] = {
    "n_obs_steps": 1,
    "use_amp": False,
    "use_peft": False,
    "push_to_hub": True,
    "repo_id": None,
    "private": None,
    "tags": None,
    "license": None,
    "pretrained_path": None,
    "pretrained_revision": None,
    "num_inference_steps": 10,
    "time_sampling_beta_alpha": 1.5,
    "time_sampling_beta_beta": 1.0,
    "time_sampling_scale": 0.999,
    "time_sampling_offset": 0.001,
    "min_period": 0.004,
    "max_period": 4.0,
    "max_action_tokens": 256,
    "use_relative_actions": False,
    "relative_exclude_joints": ["gripper"],
    "action_feature_names": None,
    "rtc_config": None,
    "image_resolution": list(IMAGE_SHAPE[1:]),
    "empty_cameras": 0,
    "text_tokenizer_name": TEXT_TOKENIZER,
    "action_tokenizer_name": ACTION_TOKENIZER,
    "temperature": 0.0,
    "max_decoding_steps": 256,
    "fast_skip_tokens": 128,
    "validate_action_token_prefix": True,
    "use_kv_cache": True,
    "gradient_checkpointing": False,
    "compile_model": False,
    "compile_mode": "max-autotune",
    "freeze_vision_encoder": False,
    "train_expert_only": False,
    "optimizer_lr": 2.5e-05,
    "optimizer_betas": [0.9, 0.95],
    "optimizer_eps": 1e-08,
    "optimizer_weight_decay": 0.01,
    "optimizer_grad_clip_norm": 1.0,
    "scheduler_warmup_steps": 1000,
    "scheduler_decay_steps": 30000,
    "scheduler_decay_lr": 2.5e-06,
}
EPS = 1e-08  # NormalizerProcessorStep's default eps


class LeRobotFilesError(ValueError):
    """Norm stats or names that do not make the files LeRobot needs."""


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What the files say beyond LeRobot's defaults."""

    kind: Kind
    paligemma_variant: str
    action_expert_variant: str
    dtype: str  # "float32" | "bfloat16"
    chunk_size: int  # openpi's action_horizon
    n_action_steps: int
    max_dim: int  # max_state_dim = max_action_dim = openpi's action_dim
    tokenizer_max_length: int  # openpi's max_token_len
    cameras: tuple[str, ...]  # LeRobot feature names of the model's image slots, in order
    state_dim: int
    action_dim: int
    device: str = "cuda"
    use_peft: bool = False  # the directory is a PEFT adapter: make_policy loads the base, then the adapter

    @property
    def norm_mode(self) -> str:
        return "MEAN_STD" if self.kind == "pi0" else "QUANTILES"

    def normalization_mapping(self) -> dict[str, str]:
        return {"VISUAL": "IDENTITY", "STATE": self.norm_mode, "ACTION": self.norm_mode}

    def input_features(self) -> dict[str, Any]:
        features = {name: {"type": "VISUAL", "shape": list(IMAGE_SHAPE)} for name in self.cameras}
        return features | {STATE: {"type": "STATE", "shape": [self.state_dim]}}

    def output_features(self) -> dict[str, Any]:
        return {ACTION: {"type": "ACTION", "shape": [self.action_dim]}}


def camera_names(renames: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """LeRobot feature names of openpi's three image slots: `observation.images.<openpi name>` unless renamed."""
    renames = dict(renames or {})
    unknown = sorted(set(renames) - set(OPENPI_CAMERAS))
    if unknown:
        raise LeRobotFilesError(f"unknown camera {unknown}: openpi's model cameras are {list(OPENPI_CAMERAS)}")
    names = tuple(renames.get(c, IMAGES + c) for c in OPENPI_CAMERAS)
    for name in names:
        if not name.startswith(IMAGES) or name == IMAGES:
            raise LeRobotFilesError(f"camera feature {name!r} must be named {IMAGES}<name>, as LeRobot's images are")
    if len(set(names)) != len(names):
        raise LeRobotFilesError(f"two cameras have the same feature name: {list(names)}")
    return names


def config_json(spec: PolicySpec) -> str:
    """The text of config.json (no trailing newline, as json.dump writes it)."""
    values = DEFAULTS | {
        "type": spec.kind,
        "input_features": spec.input_features(),
        "output_features": spec.output_features(),
        "device": spec.device,
        "use_peft": spec.use_peft,
        "paligemma_variant": spec.paligemma_variant,
        "action_expert_variant": spec.action_expert_variant,
        "dtype": spec.dtype,
        "chunk_size": spec.chunk_size,
        "n_action_steps": spec.n_action_steps,
        "max_state_dim": spec.max_dim,
        "max_action_dim": spec.max_dim,
        "normalization_mapping": spec.normalization_mapping(),
        "tokenizer_max_length": spec.tokenizer_max_length,
    }
    return json.dumps({k: values[k] for k in FIELD_ORDER[spec.kind]}, indent=4)


def _step(name: str, config: dict[str, Any], state_file: str | None = None) -> dict[str, Any]:
    return {"registry_name": name, "config": config} | ({"state_file": state_file} if state_file else {})


def processor_files(spec: PolicySpec) -> dict[str, str]:
    """{file name: JSON text} of both pipelines; their stats files are `state_file_names(spec)`."""
    norm = {"eps": EPS, "features": spec.input_features() | spec.output_features()}
    norm["norm_map"] = spec.normalization_mapping()
    pre_state, post_state = state_file_names(spec)
    tokenizer = {
        "max_length": spec.tokenizer_max_length,
        "task_key": "task",
        "padding_side": "right",
        "padding": "max_length",
        "truncation": True,
        "tokenizer_name": TEXT_TOKENIZER,
    }
    device = _step("device_processor", {"device": spec.device, "float_dtype": None})
    relative = _step(
        "relative_actions_processor",
        {"enabled": DEFAULTS["use_relative_actions"], "exclude_joints": DEFAULTS["relative_exclude_joints"]}
        | {"action_names": None},
    )
    head = [_step("rename_observations_processor", {"rename_map": {}}), _step("to_batch_processor", {})]
    normalizer = _step("normalizer_processor", norm, pre_state)
    if spec.kind == "pi0":
        pre = [*head, _step("pi0_new_line_processor", {}), _step("tokenizer_processor", tokenizer), device]
        pre += [relative, normalizer]
    else:
        prepare = f"{spec.kind}_prepare_state_tokenizer_processor_step"
        pre = [*head, relative, normalizer, _step(prepare, {}), _step("tokenizer_processor", tokenizer)]
        if spec.kind == "pi0_fast":
            fast = {"trust_remote_code": True, "max_action_tokens": DEFAULTS["max_action_tokens"]}
            pre.append(_step("action_tokenizer_processor", fast | {"action_tokenizer_name": ACTION_TOKENIZER}))
        pre.append(device)
    unnorm = {"eps": EPS, "features": spec.output_features(), "norm_map": spec.normalization_mapping()}
    post = [
        _step("unnormalizer_processor", unnorm, post_state),
        _step("absolute_actions_processor", {"enabled": DEFAULTS["use_relative_actions"]}),
        _step("device_processor", {"device": "cpu", "float_dtype": None}),
    ]
    return {
        f"{PREPROCESSOR}.json": json.dumps({"name": PREPROCESSOR, "steps": pre}, indent=2),
        f"{POSTPROCESSOR}.json": json.dumps({"name": POSTPROCESSOR, "steps": post}, indent=2),
    }


def state_file_names(spec: PolicySpec) -> tuple[str, str]:
    """The normalizer's and unnormalizer's stats files (named by their step's index in the pipeline)."""
    index = 6 if spec.kind == "pi0" else 3
    return (
        f"{PREPROCESSOR}_step_{index}_normalizer_processor.safetensors",
        f"{POSTPROCESSOR}_step_0_unnormalizer_processor.safetensors",
    )


def read_openpi_norm_stats(path: pathlib.Path) -> dict[str, dict[str, np.ndarray]]:
    """openpi's norm_stats.json (`{"norm_stats": {key: {mean, std, q01?, q99?}}}`) as float32 arrays."""
    try:
        raw = json.loads(pathlib.Path(path).read_text())["norm_stats"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LeRobotFilesError(f"{path}: not openpi norm stats ({e})") from e
    try:
        out = {
            key: {s: np.asarray(v, np.float32) for s, v in stats.items() if s in STAT_NAMES and v is not None}
            for key, stats in raw.items()
            if isinstance(stats, dict)
        }
    except (TypeError, ValueError) as e:
        raise LeRobotFilesError(f"{path}: not openpi norm stats ({e})") from e
    for key, stats in out.items():
        for name, values in stats.items():
            if not np.all(np.isfinite(values)):
                raise LeRobotFilesError(
                    f"{path}: {key}.{name} holds NaN or Inf (at index {int(np.argmin(np.isfinite(values)))}): "
                    "LeRobot's normalizer would turn every input into NaN; recompute the norm stats"
                )
    return out


def normalizer_tensors(openpi_stats: Mapping[str, Mapping[str, np.ndarray]], kind: Kind) -> dict[str, np.ndarray]:
    """The normalizer's state: `<feature>.<stat>` float32, every stat openpi has for `state` and `actions`."""
    mode = "MEAN_STD" if kind == "pi0" else "QUANTILES"
    out = {}
    for key, feature in OPENPI_STATS.items():
        stats = openpi_stats.get(key)
        if not stats:
            raise LeRobotFilesError(f"the norm stats have no {key!r} (LeRobot's {feature})")
        missing = [s for s in NEEDED_STATS[mode] if s not in stats]
        if missing:
            raise LeRobotFilesError(f"the norm stats of {key!r} lack {missing}, which {mode} normalization needs")
        dims = {np.shape(v) for v in stats.values()}
        if len(dims) != 1 or len(next(iter(dims))) != 1:
            raise LeRobotFilesError(f"the norm stats of {key!r} are not vectors of one length: {sorted(dims)}")
        out |= {f"{feature}.{s}": np.ascontiguousarray(v, np.float32) for s, v in stats.items()}
    return out


def stat_dim(tensors: Mapping[str, np.ndarray], feature: str) -> int:
    """The real (unpadded) dim of a feature, from its stats."""
    return int(next(v.shape[0] for k, v in tensors.items() if k.rsplit(".", 1)[0] == feature))


def stats_file(tensors: Mapping[str, np.ndarray]) -> bytes:
    """One stats file's bytes, as `safetensors.torch.save_file` writes them (no metadata), read back here: every
    stat must load bitwise as given."""
    from safetensors.numpy import load
    from safetensors.numpy import save

    data = save({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()})
    got = load(data)
    if got.keys() != tensors.keys() or any(
        got[k].dtype != np.float32 or not np.array_equal(got[k], tensors[k]) for k in got
    ):
        raise LeRobotFilesError("the stats do not read back as written")
    return data


def all_files(spec: PolicySpec, stats: Mapping[str, np.ndarray]) -> dict[str, bytes]:
    """{name: bytes} of config.json, both pipelines' JSON and their stats files."""
    out = {"config.json": config_json(spec).encode()}
    out |= {name: text.encode() for name, text in processor_files(spec).items()}
    return out | {name: stats_file(stats) for name in state_file_names(spec)}
