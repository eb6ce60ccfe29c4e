"""Export a merged checkpoint as openpi's PyTorch checkpoint: `model.safetensors`, `config.json`, `assets/`, manifest.

What upstream's `examples/convert_jax_model_to_pytorch.py` writes, without its three problems: the source is the
merged params (or a LoRA step, merged on the way), the dimensions come from the params' own shapes (checked against
the config's variants when openpi is here), and the file is streamed one tensor (one layer slice) at a time. Needs
numpy and `safetensors` only; torch is needed only to verify against the real model.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import datetime as dt
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from openpi_merge_plugin import __version__
from openpi_merge_plugin import options as _options
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checkpoint import pytorch_layout as layout
from openpi_merge_plugin.checkpoint import safetensors_stream
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.options import MergeOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export_model

# The model info's API, as the export's callers name it.
from openpi_merge_plugin.pipeline.export_model import ModelInfo
from openpi_merge_plugin.pipeline.export_model import Precision
from openpi_merge_plugin.pipeline.export_model import dims_from_params  # noqa: F401
from openpi_merge_plugin.pipeline.export_model import model_info_from_manifest_variants  # noqa: F401
from openpi_merge_plugin.pipeline.export_model import model_info_from_model  # noqa: F401
from openpi_merge_plugin.pipeline.export_model import model_info_from_openpi  # noqa: F401

logger = logging.getLogger("openpi_merge_plugin")

DEFAULT_OUTPUT_NAME = "merged_pytorch"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass(frozen=True)
class ExportResult:
    output: pathlib.Path
    manifest: dict[str, Any]


def export_pytorch(
    src: pathlib.Path | str,
    *,
    output: pathlib.Path | str | None = None,
    precision: Precision = "float32",
    model: ModelInfo | None = None,
    action_horizon: int | None = None,
    model_dtype: Precision = "bfloat16",
    lora: checkpoint_merge.LoRASource | None = None,
    overwrite: bool = False,
    allow_nonstandard_dims: bool = False,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Writes the PyTorch checkpoint of `src` (a merged directory, or a LoRA step: merged on the way).

    The model config comes from `model`, else (without openpi) from `action_horizon` and `model_dtype` with the
    variants the merge records, else from the openpi config the merge records. Default output: `<step>/merged_pytorch`
    for a LoRA step, `<merged>_pytorch` beside a merged directory. Atomic like the merged checkpoint; the source is
    never modified.
    """
    for name, check, value in (
        ("precision", _options.one_of(Precision), precision),
        ("model_dtype", _options.one_of(Precision), model_dtype),
        ("action_horizon", _options.optional(_options.positive_int), action_horizon),
    ):
        if (problem := check(value)) is not None:
            raise _options.OptionError(name, problem)
    if model is not None and action_horizon is not None:
        raise ConfigError("--config and --action-horizon are alternatives: give one")
    src = pathlib.Path(src).resolve()
    merged_dir, step_dir = merged_source(src)
    if merged_dir is None:
        default, protected = step_dir / _output.PYTORCH_NAME, [checkpoint_merge.protect_step(step_dir)]
    else:
        default, protected = merged_dir.parent / f"{merged_dir.name}_pytorch", protected_for_merged(merged_dir)
    out = output_guard.check_output(output if output is not None else default, overwrite=overwrite, protected=protected)
    if merged_dir is None:  # a LoRA step: merged first (streamed, verified) into a scratch sibling of `out`
        planned = checkpoint_merge.plan_step_merge(step_dir, lora, MergeOptions())
        structure = planned.structure
        record = {"lora_config": planned.resolved.to_json(), **planned.serving_config.to_json()}
    else:
        planned, structure = None, sources.OrbaxSource(merged_dir / "params").tree
        record = json.loads((merged_dir / _output.MANIFEST).read_text())
    if model is None and action_horizon is not None:
        model = export_model.model_info_from_variants(record, action_horizon=action_horizon, model_dtype=model_dtype)
    # Everything that can be refused is refused here, before the merge and the writes.
    plan_export(structure, record, precision, model, allow_nonstandard_dims=allow_nonstandard_dims, what=src)
    with _output.scratch_directory(out) as scratch:
        if planned is not None:
            merged_dir = scratch / _output.MERGED_NAME
            merged_dir.mkdir()
            checkpoint_merge.write_merge(merged_dir, planned, merged_dir)
            source_info = {"lora_step": str(step_dir), "merged_on_the_way": True}
        else:
            source_info = {"merged": str(merged_dir), "merged_on_the_way": False}
        with _output.staged_directory(out, overwrite=overwrite) as tmp:
            manifest = write_export(
                tmp,
                merged_dir,
                precision,
                model,
                out,
                source_info=source_info,
                allow_nonstandard_dims=allow_nonstandard_dims,
                progress=progress,
            )
    logger.info("exported %s to %s (%s)", src, out, precision)
    return ExportResult(out, manifest)


def merged_source(src: pathlib.Path) -> tuple[pathlib.Path | None, pathlib.Path]:
    """(merged dir or None for a LoRA step, the step dir)."""
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if (src / _output.MANIFEST).is_file() and (src / "params").is_dir():
        return src, src.parent
    if (src / "params").is_dir():
        checkpoint_merge.check_step_dir(src)
        return None, src
    raise CheckpointError(f"{src} is neither a merged checkpoint (params/ and manifest.json) nor a LoRA step (params/)")


def protected_for_merged(merged_dir: pathlib.Path) -> list[output_guard.Protected]:
    """A merged directory, and the LoRA step it came from (as its manifest records it, or as its parent)."""
    protected = [output_guard.Protected(merged_dir, "the merged checkpoint")]
    try:
        recorded = json.loads((merged_dir / _output.MANIFEST).read_text()).get("source", {}).get("step_dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded and pathlib.Path(recorded).is_dir():
        protected.append(
            output_guard.Protected(
                pathlib.Path(recorded), "the LoRA step of this merge", output_guard.STEP_OUTPUT_NAMES
            )
        )
    if (merged_dir.parent / "params").is_dir():
        protected.append(checkpoint_merge.protect_step(merged_dir.parent))
    return protected


def write_export(
    directory: pathlib.Path,
    merged_dir: pathlib.Path,
    precision: Precision,
    model: ModelInfo | None,
    output_path: pathlib.Path,
    *,
    source_info: dict[str, Any] | None = None,
    allow_nonstandard_dims: bool = False,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Writes model.safetensors (streamed), config.json, assets/ and, last, manifest.json into `directory`."""
    start = time.perf_counter()
    merged_manifest = json.loads((merged_dir / _output.MANIFEST).read_text())
    source = sources.OrbaxSource(merged_dir / "params")
    plan, model = plan_export(
        source.tree, merged_manifest, precision, model, allow_nonstandard_dims=allow_nonstandard_dims, what=merged_dir
    )
    action_dim = int(source.tree["action_in_proj/kernel"].shape[0])
    done = [0]

    def produce(spec: layout.TensorSpec) -> np.ndarray | None:
        done[0] += 1
        if progress is not None:
            progress("export", done[0], len(plan))
        return (
            None if spec.recipe.source is None else layout.apply(spec.recipe, read_recipe_source(source, spec.recipe))
        )

    safetensors_stream.write(directory / MODEL_FILE, plan.tensors, produce, plan.metadata)
    (directory / CONFIG_FILE).write_text(
        layout.config_json(
            action_dim=action_dim,
            action_horizon=model.action_horizon,
            paligemma_variant=model.paligemma_variant,
            action_expert_variant=model.action_expert_variant,
            precision=precision,
        )
    )
    if (merged_dir / "assets").is_dir():
        shutil.copytree(merged_dir / "assets", directory / "assets")
    readback = verify_file(directory / MODEL_FILE, plan, source)
    manifest = {
        "format_version": FORMAT_VERSION,
        "plugin": "openpi-merge-plugin",
        "plugin_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "format": "pytorch",
        "source": {
            **(source_info or {"merged": str(merged_dir)}),
            "step": merged_manifest.get("source", {}).get("step"),
            "merged_manifest_sha256": _output.sha256_of(merged_dir / _output.MANIFEST),
        },
        "output": str(output_path),
        "serving_config": merged_manifest.get("serving_config"),
        "serving_config_reason": merged_manifest.get("serving_config_reason"),
        "lora_config": merged_manifest.get("lora_config"),
        "model": {**dataclasses.asdict(model), "pi05": plan.pi05, "action_dim": action_dim},
        "precision": precision,
        "precision_rules": (
            "bfloat16: every tensor bf16(x); float32: f32(bf16(x)) for every parameter PI0Pytorch holds in bfloat16 "
            f"under Pi0Config.dtype={model.model_dtype!r}, x exactly for the rest (as upstream's converter)"
        ),
        "tensors": len(plan),
        # Written with --allow-nonstandard-dims: loads only into a PI0Pytorch built with these dimensions.
        "nonstandard_dims": {k: {"model": m, "pi0pytorch": t} for k, (m, t) in plan.nonstandard_dims.items()},
        "tied": plan.metadata,
        "verification": {
            "merge": {k: merged_manifest.get(k) for k in ("verified", "max_rel_err") if k in merged_manifest},
            "file": readback,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    return _output.write_manifest(directory, manifest)


def plan_export(
    structure: dict[str, Any],
    merge_record: dict[str, Any],
    precision: Precision,
    model: ModelInfo | None,
    *,
    allow_nonstandard_dims: bool,
    what: Any,
) -> tuple[layout.Layout, ModelInfo]:
    """The file's layout for a merged params structure (path -> shape, dtype), and the model info it used.

    `merge_record` is the merge's manifest (or what it will record: `lora_config`, `serving_config`), which names
    the openpi config when `model` is None. Reads nothing but the config, so it runs before any work.
    """
    tree = {p: (tuple(sd.shape), str(sd.dtype)) for p, sd in structure.items()}
    if any("lora_" in p.rsplit("/", 1)[-1] for p in tree):
        raise CheckpointError(f"{what} still holds LoRA leaves: not a merged checkpoint")
    if model is None:
        model = export_model.model_info_from_record(merge_record)
    paligemma, expert = export_model.dims_from_params(structure, ""), export_model.dims_from_params(structure, "_1")
    export_model.check_variants(model, paligemma, expert)
    action_dim = int(structure["action_in_proj/kernel"].shape[0])
    try:
        plan = _plan(
            tree, paligemma, expert, action_dim, precision, model, allow_nonstandard_dims=allow_nonstandard_dims
        )
    except layout.NonstandardDimsError as e:
        raise ConfigError(str(e)) from e
    except layout.LayoutError as e:
        raise ConfigError(f"{what}: {e}") from e
    return plan, model


def _plan(tree, paligemma, expert, action_dim, precision, model, *, allow_nonstandard_dims) -> layout.Layout:
    return layout.build_layout(
        tree,
        paligemma=paligemma,
        action_expert=expert,
        action_dim=action_dim,
        precision=precision,
        model_dtype=model.model_dtype,
        pi05=model.pi05,
        allow_nonstandard_dims=allow_nonstandard_dims,
    )


def verify_file(path: pathlib.Path, plan: layout.Layout, source: sources.OrbaxSource) -> dict[str, Any]:
    """Reads the file back with the safetensors library and checks every tensor, bitwise, against its recipe."""
    from safetensors import safe_open

    checked = 0
    with safe_open(str(path), framework="numpy") as f:
        names = set(f.keys())
    if names != {t.name for t in plan.tensors}:
        raise CheckpointError(f"{path}: the file's tensors are not the layout's")
    for spec in plan.tensors:
        recipe = spec.recipe
        want = None if recipe.source is None else layout.apply(recipe, read_recipe_source(source, recipe))
        if not _reads_back(path, spec, want):
            raise CheckpointError(f"{path}: tensor {spec.name} does not read back as written")
        del want
        checked += 1
    return {"reader": "safetensors.safe_open", "tensors_checked": checked, "bitwise": True}


READBACK_CHUNK_BYTES = 256 << 20


def _reads_back(path: pathlib.Path, spec: layout.TensorSpec, want: np.ndarray | None) -> bool:
    """Whether the file's tensor equals `want` (None: zeros) bitwise, read in row blocks of at most
    READBACK_CHUNK_BYTES so that a large tensor (the 2 GB embedding) is never held twice."""
    from safetensors import safe_open

    if want is not None and tuple(want.shape) != tuple(spec.shape):
        return False
    # safetensors' numpy slices do not know bfloat16: bf16 tensors (at most half the size) are read whole.
    sliced = bool(spec.shape) and spec.dtype == "F32"
    rows = spec.shape[0] if sliced else 1
    step = max(1, READBACK_CHUNK_BYTES // max(1, spec.nbytes // rows)) if sliced else 1
    for start in range(0, rows, step):
        # Opened per block: safe_open maps the file, and the pages a read touched stay resident while it is open.
        with safe_open(str(path), framework="numpy") as f:
            block = f.get_slice(spec.name)[start : min(start + step, rows)] if sliced else f.get_tensor(spec.name)
        got = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        if want is None:
            ok = not np.any(got)
        else:
            part = want[start : start + step] if sliced else want
            ok = got.size == part.nbytes and np.array_equal(got, np.ascontiguousarray(part).reshape(-1).view(np.uint8))
        del block, got
        if not ok:
            return False
    return True


def read_recipe_source(source: sources.OrbaxSource, recipe: layout.Recipe) -> np.ndarray:
    """The recipe's source: one layer slice of a scanned leaf, or the whole leaf."""
    if recipe.layer is None:
        return source.read([recipe.source])[recipe.source]
    return np.asarray(source.sliced(recipe.source)[(recipe.layer,)])
