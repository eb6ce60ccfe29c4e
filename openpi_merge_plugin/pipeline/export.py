"""Export a merged checkpoint as openpi's PyTorch checkpoint: `model.safetensors`, `config.json`, `assets/`, manifest.

What upstream's `examples/convert_jax_model_to_pytorch.py` writes, without its three problems: the source is the
merged params (or a LoRA step, merged on the way), the dimensions come from the params' own shapes (checked against
the config's variants when openpi is here), and the file is streamed one tensor (one layer slice) at a time. Needs
numpy and `safetensors` only; torch is needed only to verify against the real model.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
import json
import logging
import pathlib
import shutil
import time
from typing import Any

from openpi_merge_plugin import options as _options
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checkpoint import safetensors_stream
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.options import MergeOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export_stream
from openpi_merge_plugin.pipeline import model_facts as export_model

# The model info's API, as the export's callers name it.
from openpi_merge_plugin.pipeline.model_facts import ModelInfo
from openpi_merge_plugin.pipeline.model_facts import Precision
from openpi_merge_plugin.pipeline.model_facts import dims_from_params  # noqa: F401
from openpi_merge_plugin.pipeline.model_facts import model_info_from_manifest_variants  # noqa: F401
from openpi_merge_plugin.pipeline.model_facts import model_info_from_model  # noqa: F401
from openpi_merge_plugin.pipeline.model_facts import model_info_from_openpi  # noqa: F401

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
    source = lora_step_source(step_dir, lora) if merged_dir is None else merged_dir_source(merged_dir)
    if model is None and action_horizon is not None:
        model = export_model.model_info_from_variants(
            source.record, action_horizon=action_horizon, model_dtype=model_dtype
        )
    # Everything that can be refused is refused here, before the merge and the writes.
    plan, model = plan_export(
        source.structure, source.record, precision, model, allow_nonstandard_dims=allow_nonstandard_dims, what=src
    )
    with _output.staged_directory(out, overwrite=overwrite) as tmp:
        manifest = _write(tmp, source, plan, model, out, progress=progress)
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


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What the export's one pass reads: params (merged, or a LoRA step's, merged on the way), and their record."""

    params: sources.ParamSource
    record: dict[str, Any]  # the merge's manifest, or what the merge on the way records (lora and serving config)
    assets: pathlib.Path | None
    info: dict[str, Any]  # the manifest's `source`
    merge: export_stream.Merge | None = None  # None: the params are merged already (the identity merge)

    @property
    def what(self) -> Any:
        return self.info.get("merged") or self.info.get("lora_step")

    @functools.cached_property
    def structure(self) -> dict[str, Any]:
        """The merged params' structure (path -> shape, dtype): the LoRA leaves gone, the merged weights' dtype."""
        if self.merge is None:
            return self.params.tree
        return engine.merged_structure(self.params.tree, self.merge.adapters, self.merge.options)

    def merge_check(self) -> dict[str, Any]:
        """The merge's verification: the merged directory's record, or the merge on the way's own report."""
        if self.merge is None:
            return {k: self.record.get(k) for k in ("verified", "max_rel_err") if k in self.record}
        return {"verified": self.merge.report.verified, "max_rel_err": self.merge.report.max_rel_err}


def merged_dir_source(merged_dir: pathlib.Path, source_info: dict[str, Any] | None = None) -> ExportSource:
    """A merged directory, read as it is (the identity merge)."""
    merged_manifest = json.loads((merged_dir / _output.MANIFEST).read_text())
    info = {
        **(source_info or {"merged": str(merged_dir), "merged_on_the_way": False}),
        "step": merged_manifest.get("source", {}).get("step"),
        "merged_manifest_sha256": _output.sha256_of(merged_dir / _output.MANIFEST),
    }
    return ExportSource(sources.OrbaxSource(merged_dir / "params"), merged_manifest, merged_dir / "assets", info)


def lora_step_source(step_dir: pathlib.Path, lora: checkpoint_merge.LoRASource | None) -> ExportSource:
    """A LoRA step, merged in the export's pass one layer slice at a time, verified as `merged/` is."""
    planned = checkpoint_merge.plan_step_merge(step_dir, lora, MergeOptions())
    return ExportSource(
        planned.source,
        {"lora_config": planned.resolved.to_json(), **planned.serving_config.to_json()},
        step_dir / "assets",
        {"lora_step": str(step_dir), "merged_on_the_way": True, "step": planned.source_info["step"]},
        export_stream.Merge(planned.adapters, planned.options),
    )


def write_model_file(
    path: pathlib.Path, plan: Any, metadata: dict[str, str] | None, source: ExportSource, progress: ProgressFn | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one pass: each leaf read once (merged on the way), laid out, written at its offset and hashed; then the
    file read back once against the hashes (`safetensors_stream.read_back`). `plan`: a layout with `.tensors` (PyTorch's or
    LeRobot's). Returns the manifest's read-back record and the file's checksum entry (not hashed again)."""
    done = 0
    writer = safetensors_stream.PositionalWriter(path, plan.tensors, metadata)
    with writer, safetensors_stream.InBackground() as background:
        for spec, rows, array in export_stream.laid_out_tensors(source.params, plan, source.merge):
            if array is None:
                background.submit(writer.write_zeros, spec.name)
            else:
                background.submit(writer.write, spec.name, array, rows)
            del array
            if progress is not None and (rows is None or rows.stop == spec.shape[0]):
                done += 1
                progress("export", done, len(plan.tensors))
    readback = safetensors_stream.read_back(path, writer.digests, writer.header)
    record = {
        "reader": "safetensors.safe_open (header) and os.preadv (bytes at the header's offsets)",
        "tensors_checked": readback.tensors_checked,
        "bitwise": True,
        "check": (
            "safe_open reports every tensor's name, dtype and shape as written; sha256 of each tensor's bytes as "
            "written == as read at its offsets; each tensor's first and last rows as safe_open reads them == "
            "those bytes"
        ),
    }
    return record, {path.name: {"sha256": readback.file_sha256, "bytes": readback.bytes}}


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
    """Writes model.safetensors, config.json, assets/ and, last, manifest.json of a merged directory into
    `directory`, in one pass over its params."""
    source = merged_dir_source(merged_dir, source_info)
    plan, model = plan_export(
        source.structure,
        source.record,
        precision,
        model,
        allow_nonstandard_dims=allow_nonstandard_dims,
        what=source.what,
    )
    return _write(directory, source, plan, model, output_path, progress=progress)


def _write(
    directory: pathlib.Path,
    source: ExportSource,
    plan: layout.Layout,
    model: ModelInfo,
    output_path: pathlib.Path,
    *,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """The one pass: each leaf read once (merged on the way), laid out, written at its offset and hashed; then the
    file read back once against the hashes (`safetensors_stream.read_back`)."""
    start = time.perf_counter()
    precision = plan.precision
    action_dim = int(source.structure["action_in_proj/kernel"].shape[0])
    readback, known = write_model_file(directory / MODEL_FILE, plan, plan.metadata, source, progress)
    (directory / CONFIG_FILE).write_text(
        layout.config_json(
            action_dim=action_dim,
            action_horizon=model.action_horizon,
            paligemma_variant=model.paligemma_variant,
            action_expert_variant=model.action_expert_variant,
            precision=precision,
        )
    )
    if source.assets is not None and source.assets.is_dir():
        shutil.copytree(source.assets, directory / "assets")
    manifest = {
        **_output.manifest_head(FORMAT_VERSION),
        "format": "pytorch",
        "source": source.info,
        "output": str(output_path),
        "serving_config": source.record.get("serving_config"),
        "serving_config_reason": source.record.get("serving_config_reason"),
        "lora_config": source.record.get("lora_config"),
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
            "merge": source.merge_check(),
            "file": readback,
        },
        "seconds": round(time.perf_counter() - start, 3),
    }
    return _output.write_manifest(directory, manifest, known=known)


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
