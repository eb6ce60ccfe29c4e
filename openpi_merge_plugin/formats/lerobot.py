"""Export a merged checkpoint for LeRobot 0.6.1: the directory `PI0Policy` / `PI05Policy` / `PI0FastPolicy`
`.from_pretrained(DIR)` and `make_pre_post_processors(config, pretrained_path=DIR)` load.

`model.safetensors` (`lerobot_layout`: the one layout table, LeRobot's names and dtypes, streamed one tensor or
layer slice at a time), `config.json` and the processor files (`lerobot_files`, as LeRobot's `save_pretrained`
writes them, normalization stats from the step's openpi norm stats), and `manifest.json`; committed atomically.
The source and output handling are the PyTorch export's (`pytorch_export`). Needs no LeRobot, torch or openpi.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import logging
import pathlib
import time
from typing import Any

import numpy as np

from openpi_merge_plugin import options as _options
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import lerobot_files as files
from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export as pytorch_export
from openpi_merge_plugin.pipeline import model_facts as export_model
from openpi_merge_plugin.pipeline.model_facts import Precision

logger = logging.getLogger("openpi_merge_plugin")

MODEL_FILE = "model.safetensors"
FORMAT_VERSION = 1
# The one switch for pi0-FAST: None exports it; a reason (what LeRobot's PI0FastPolicy computes differently from
# openpi's Pi0FAST) refuses it with that reason, before any work.
PI0_FAST_REFUSED: str | None = (
    "LeRobot 0.6.1's PI0FastPolicy decodes differently from openpi's Pi0FAST: it appends a BOS token after the prompt "
    "and predicts the first action token from it, where openpi predicts it from the prompt's last token (and it does "
    "not lowercase the task). Its prompt logits match openpi's, but an openpi-trained pi0-FAST would decode other "
    "actions in LeRobot (see docs/lerobot.md)"
)
# openpi's max_token_len defaults (Pi0Config: 200 for pi0.5, else 48; Pi0FASTConfig: 250).
DEFAULT_MAX_TOKEN_LEN = {"pi0": 48, "pi05": 200, "pi0_fast": 250}


@dataclasses.dataclass(frozen=True)
class LeRobotModel:
    """What the files need of the openpi config beyond the params."""

    action_horizon: int
    max_token_len: int | None = None  # None: openpi's default for the model
    action_dim: int | None = None  # pi0-FAST's (its params have no action projection); None: the norm stats'
    asset_id: str | None = None  # where the norm stats are (assets/<asset_id>/); None: the only one there
    config_name: str | None = None


@dataclasses.dataclass(frozen=True)
class Naming:
    """How the files name the model's inputs and run it, beyond the model itself."""

    cameras: Mapping[str, str] = dataclasses.field(default_factory=dict)  # openpi camera -> LeRobot feature name
    n_action_steps: int | None = None  # None: the whole chunk
    device: str = "cuda"
    norm_stats: pathlib.Path | None = None  # an openpi norm_stats.json to use instead of the checkpoint's


@dataclasses.dataclass(frozen=True)
class Plan:
    layout: lerobot_layout.LeRobotLayout
    spec: files.PolicySpec
    stats: dict[str, np.ndarray]
    norm_stats_path: pathlib.Path


def model_from_train_config(config: Any, *, config_name: str | None = None) -> LeRobotModel:
    """From an openpi TrainConfig: horizon, token length, pi0-FAST's action_dim, the data config's asset_id."""
    model = config.model
    asset_id = _asset_id(config)
    fast = not hasattr(model, "action_expert_variant")
    return LeRobotModel(
        int(model.action_horizon),
        int(model.max_token_len),
        int(model.action_dim) if fast else None,
        asset_id,
        config_name or getattr(config, "name", None),
    )


def _asset_id(config: Any) -> str | None:
    """The data config's asset_id as openpi's serving reads it (`data.create(...).asset_id`, which a data config
    may set in `create`), else its `assets.asset_id` or `repo_id`."""
    data = getattr(config, "data", None)
    try:
        return data.create(config.assets_dirs, config.model).asset_id
    except Exception:  # a data config that cannot be created here (no dataset metadata): its fields
        assets, repo_id = getattr(data, "assets", None), getattr(data, "repo_id", None)
        return getattr(assets, "asset_id", None) or (repo_id if isinstance(repo_id, str) else None)


def model_from_openpi(config_name: str) -> LeRobotModel:
    from openpi_merge_plugin.lora import openpi_configs

    config = openpi_configs.train_config(config_name, without="; or pass --action-horizon")
    return model_from_train_config(config, config_name=config_name)


def _model_from_record(record: dict[str, Any]) -> LeRobotModel:
    return export_model.from_recorded_config(
        record, model_from_openpi, needs="action_horizon, max_token_len", otherwise="--action-horizon N"
    )


def export_lerobot(
    src: pathlib.Path | str,
    *,
    output: pathlib.Path | str | None = None,
    precision: Precision = "float32",
    model: LeRobotModel | None = None,
    naming: Naming = Naming(),
    lora: checkpoint_merge.LoRASource | None = None,
    overwrite: bool = False,
    allow_nonstandard_dims: bool = False,
    progress: pytorch_export.ProgressFn | None = None,
) -> pytorch_export.ExportResult:
    """Writes the LeRobot directory of `src` (a merged directory, or a LoRA step: merged on the way).

    Default output: `<step>/merged_lerobot` for a LoRA step, `<merged>_lerobot` beside a merged directory.
    """
    if (problem := _options.one_of(Precision)(precision)) is not None:
        raise _options.OptionError("precision", problem)
    src = pathlib.Path(src).resolve()
    merged_dir, step_dir = pytorch_export.merged_source(src)
    if merged_dir is None:
        default, protected = step_dir / output_guard.LEROBOT_NAME, [checkpoint_merge.protect_step(step_dir)]
    else:
        default, protected = (
            merged_dir.parent / f"{merged_dir.name}_lerobot",
            pytorch_export.protected_for_merged(merged_dir),
        )
    out = output_guard.check_output(output if output is not None else default, overwrite=overwrite, protected=protected)
    if merged_dir is None:  # a LoRA step: merged in the export's one pass
        source = pytorch_export.lora_step_source(step_dir, lora)
    else:
        source = pytorch_export.merged_dir_source(merged_dir)
    if model is None:
        model = _model_from_record(source.record)
    # Everything that can be refused is refused here, before the merge and the writes.
    plan = plan_lerobot(
        source.structure,
        source.assets,
        precision,
        model,
        naming,
        allow_nonstandard_dims=allow_nonstandard_dims,
        what=src,
    )
    with _output.staged_directory(out, overwrite=overwrite) as tmp:
        manifest = _write(tmp, source, plan, model, out, progress=progress)
    logger.info("exported %s for LeRobot to %s (%s)", src, out, precision)
    return pytorch_export.ExportResult(out, manifest)


def find_norm_stats(assets: pathlib.Path, asset_id: str | None) -> pathlib.Path:
    """`assets/<asset_id>/norm_stats.json`, as openpi's `load_norm_stats` reads it; without an asset_id, the only
    norm stats under `assets/`."""
    if asset_id is not None:
        path = assets / asset_id / "norm_stats.json"
        if not path.is_file():
            raise ConfigError(f"no norm stats for asset_id {asset_id!r}: {path} is not a file")
        return path
    found = sorted(assets.glob("*/norm_stats.json")) if assets.is_dir() else []
    if len(found) != 1:
        what = f"{len(found)} ({', '.join(p.parent.name for p in found)})" if found else "none"
        raise ConfigError(
            f"LeRobot's processors need the model's norm stats, and {assets} has {what}: pass --asset-id NAME "
            "(openpi's data config asset_id)"
        )
    return found[0]


def plan_lerobot(
    structure: Mapping[str, Any],
    assets: pathlib.Path,
    precision: Precision,
    model: LeRobotModel,
    naming: Naming,
    *,
    allow_nonstandard_dims: bool,
    what: Any,
) -> Plan:
    """The file layout, the policy spec and the normalizer stats; reads only shapes and the norm stats."""
    tree = {p: (tuple(sd.shape), str(sd.dtype)) for p, sd in structure.items()}
    if any("lora_" in p.rsplit("/", 1)[-1] for p in tree):
        raise CheckpointError(f"{what} still holds LoRA leaves: not a merged checkpoint")
    kind = lerobot_layout.detect_kind(tree)
    if kind == "pi0_fast" and PI0_FAST_REFUSED:
        raise ConfigError(f"pi0-FAST is not exported for LeRobot: {PI0_FAST_REFUSED}")
    paligemma = export_model.dims_from_params(structure, "")
    expert = export_model.dims_from_params(structure, "_1") if kind != "pi0_fast" else None
    params_action_dim = int(tree["action_in_proj/kernel"][0][0]) if kind != "pi0_fast" else None
    try:
        lay = lerobot_layout.build_lerobot_layout(
            tree,
            paligemma=paligemma,
            action_expert=expert,
            action_dim=params_action_dim,
            precision=precision,
            allow_nonstandard_dims=allow_nonstandard_dims,
        )
        cameras = files.camera_names(naming.cameras)
        norm_path = naming.norm_stats or find_norm_stats(assets, model.asset_id)
        stats = files.normalizer_tensors(files.read_openpi_norm_stats(norm_path), kind)
    except layout.NonstandardDimsError as e:
        raise ConfigError(str(e)) from e
    except (layout.LayoutError, files.LeRobotFilesError) as e:
        raise ConfigError(f"{what}: {e}") from e
    state_dim, action_dim = files.stat_dim(stats, files.STATE), files.stat_dim(stats, files.ACTION)
    max_dim = params_action_dim or model.action_dim or action_dim
    # pi0/pi0.5 pad state and actions to action_dim (state_proj, action_in_proj); pi0-FAST puts the state, unpadded,
    # into the prompt.
    for name, dim in (("state", state_dim), ("actions", action_dim)) if kind != "pi0_fast" else ():
        if dim > max_dim:
            raise ConfigError(f"{norm_path}: {name} has {dim} dims, more than the model's action_dim {max_dim}")
    if kind == "pi0_fast" and action_dim != max_dim:
        raise ConfigError(
            f"{norm_path}: actions have {action_dim} dims, pi0-FAST's action_dim is {max_dim}; LeRobot decodes the "
            "FAST tokens with the action feature's dim, so they must be equal"
        )
    n_steps = naming.n_action_steps or model.action_horizon
    if not 0 < n_steps <= model.action_horizon:
        raise ConfigError(f"--n-action-steps {n_steps} must be 1..the action horizon {model.action_horizon}")
    spec = files.PolicySpec(
        kind=kind,
        paligemma_variant=lay.paligemma_variant,
        action_expert_variant=lay.action_expert_variant,
        dtype=precision,
        chunk_size=model.action_horizon,
        n_action_steps=n_steps,
        max_dim=max_dim,
        tokenizer_max_length=model.max_token_len or DEFAULT_MAX_TOKEN_LEN[kind],
        cameras=cameras,
        state_dim=state_dim,
        action_dim=action_dim,
        device=naming.device,
    )
    return Plan(lay, spec, stats, norm_path)


def write_lerobot(
    directory: pathlib.Path,
    merged_dir: pathlib.Path,
    precision: Precision,
    model: LeRobotModel,
    output_path: pathlib.Path,
    *,
    naming: Naming = Naming(),
    source_info: dict[str, Any] | None = None,
    allow_nonstandard_dims: bool = False,
    progress: pytorch_export.ProgressFn | None = None,
) -> dict[str, Any]:
    """Writes the LeRobot directory of a merged directory into `directory` (merge on save's export)."""
    source = pytorch_export.merged_dir_source(merged_dir, source_info)
    plan = plan_lerobot(
        source.structure,
        source.assets,
        precision,
        model,
        naming,
        allow_nonstandard_dims=allow_nonstandard_dims,
        what=source.what,
    )
    return _write(directory, source, plan, model, output_path, progress=progress)


def _write(
    directory: pathlib.Path,
    source: pytorch_export.ExportSource,
    plan: Plan,
    model: LeRobotModel,
    output_path: pathlib.Path,
    *,
    progress: pytorch_export.ProgressFn | None,
) -> dict[str, Any]:
    """model.safetensors (the export's one pass), config.json, the processor files and, last, manifest.json."""
    start = time.perf_counter()
    readback, known = pytorch_export.write_model_file(directory / MODEL_FILE, plan.layout, None, source, progress)
    side_files = files.write_all(directory, plan.spec, plan.stats)
    stats_check = _verify_stats(directory, plan)
    checkpoint = source.assets.parent if source.assets is not None else None
    norm_stats = plan.norm_stats_path
    manifest = {
        **_output.manifest_head(FORMAT_VERSION),
        "format": "lerobot",
        "lerobot_version": "0.6.1",
        "source": {
            **source.info,
            # Relative: the checkpoint's own assets (the same in the step and its merge); absolute: --norm-stats.
            "norm_stats": str(
                norm_stats.relative_to(checkpoint)
                if checkpoint is not None and norm_stats.is_relative_to(checkpoint)
                else norm_stats
            ),
            "norm_stats_sha256": _output.sha256_of(norm_stats),
        },
        "output": str(output_path),
        "serving_config": source.record.get("serving_config"),
        "lora_config": source.record.get("lora_config"),
        "policy": {"type": plan.spec.kind, **dataclasses.asdict(model)},
        "precision": plan.layout.precision,
        "precision_rules": (
            "LeRobot's to_bfloat16_for_selected_params under config dtype "
            f"{plan.layout.precision!r}: bfloat16 tensors are bf16(x), float32 ones exactly x"
        ),
        "tensors": len(plan.layout),
        # Written with --allow-nonstandard-dims: loads only into a LeRobot patched to these dimensions.
        "nonstandard_dims": {k: {"model": m, "lerobot": t} for k, (m, t) in plan.layout.nonstandard_dims.items()},
        "files_written": [MODEL_FILE, *side_files],
        "verification": {
            "merge": source.merge_check(),
            "file": readback,
            "normalizer_stats": stats_check,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    return _output.write_manifest(directory, manifest, known=known)


def _verify_stats(directory: pathlib.Path, plan: Plan) -> dict[str, Any]:
    """Both stats files read back with safetensors: every stat bitwise as the norm stats give it."""
    from safetensors.numpy import load_file

    for name in files.state_file_names(plan.spec):
        got = load_file(str(directory / name))
        if got.keys() != plan.stats.keys() or any(
            got[k].dtype != np.float32 or not np.array_equal(got[k], plan.stats[k]) for k in got
        ):
            raise CheckpointError(f"{directory / name}: the stats do not read back as written")
    return {"reader": "safetensors.numpy.load_file", "files": 2, "stats": len(plan.stats), "bitwise": True}
