"""Merging an openpi step directory on disk: check input, plan, merge, write, manifest, commit."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import logging
import pathlib
import time
from typing import Any

import numpy as np

from openpi_merge_plugin.checkpoint import orbax_stream
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora.configs import LoRASource
from openpi_merge_plugin.lora.configs import ResolvedLoRA
from openpi_merge_plugin.lora.configs import resolve_lora
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.merge.report import MergeReport
from openpi_merge_plugin.serving import names as serving

logger = logging.getLogger("openpi_merge_plugin")

MANIFEST_FORMAT_VERSION = 1
DEFAULT_OUTPUT_NAME = _output.MERGED_NAME


@dataclasses.dataclass
class CheckpointMergeResult:
    output: pathlib.Path
    report: MergeReport
    manifest: dict[str, Any]


@dataclasses.dataclass
class LoRAStep:
    """An openpi LoRA step read into memory: what `merge_params` takes."""

    params: dict[str, Any]  # nested, as openpi's restore_params returns it (bf16 base weights, fp32 adapters)
    lora: ResolvedLoRA  # the LoRA config of each expert


def read_lora_step(step_dir: pathlib.Path | str, lora: LoRASource | None = None) -> LoRAStep:
    """Reads a LoRA step's params whole (small models; `merge_checkpoint` streams) and resolves its LoRA config."""
    step_dir = pathlib.Path(step_dir).resolve()
    source = sources.OrbaxSource(check_step_dir(step_dir))
    resolved = resolve_lora(source.tree, lora or LoRASource())
    return LoRAStep(params=sources.unflatten(source.read(source.tree)), lora=resolved)


def check_step_dir(step_dir: pathlib.Path) -> pathlib.Path:
    """Returns the params item of an openpi step directory, or raises a CheckpointError saying what is wrong."""
    sources.check_utf8(step_dir)
    if not step_dir.exists():
        raise CheckpointError(f"checkpoint {step_dir} does not exist")
    if not step_dir.is_dir():
        raise CheckpointError(f"checkpoint {step_dir} is a file, not an openpi step directory")
    params_dir = step_dir / "params"
    if not params_dir.is_dir():
        hint = ""
        if any(p.name.isdigit() for p in step_dir.iterdir() if p.is_dir()):
            steps = sorted(int(p.name) for p in step_dir.iterdir() if p.is_dir() and p.name.isdigit())
            hint = f" (it holds steps {steps}: pass one of them, e.g. {step_dir / str(steps[-1])})"
        raise CheckpointError(f"{step_dir} is not an openpi checkpoint step: it has no params/ directory{hint}")
    return params_dir


def serving_for(
    resolved: ResolvedLoRA, structure: dict[str, _adapters.ShapeDtype], run_config: Any | None = None
) -> serving.ServingConfig:
    """The openpi config that serves a merge with this structure, checked in this process; or why there is none."""
    if resolved.config_name is None:
        return serving.without_openpi_config(resolved.source)
    from openpi_merge_plugin.serving import twins

    return twins.check(resolved.config_name, structure, run_config)


@dataclasses.dataclass
class MergePlan:
    """A merge read and planned, nothing written yet: the one pipeline's first half (`plan_merge`)."""

    source: sources.ParamSource  # an Orbax step's params, or live (maybe sharded) training params
    resolved: ResolvedLoRA
    adapters: list[_adapters.Adapter]
    options: engine.MergeOptions
    serving_config: serving.ServingConfig
    structure: dict[str, _adapters.ShapeDtype]  # of the merged params
    source_info: dict[str, Any]  # recorded in the manifest
    save_assets: Callable[[pathlib.Path], None] | None = None  # writes the norm stats beside the params

    def needed_bytes(self, *, assets: pathlib.Path | None = None, block: int = 4096) -> int:
        """An upper bound of the disk space the merged checkpoint takes (`output.disk_bytes`): the merged params,
        Orbax's metadata, the manifest, and a copy of `assets`."""
        return _output.disk_bytes(
            (int(np.prod(sd.shape, dtype=np.int64)) * np.dtype(sd.dtype).itemsize for sd in self.structure.values()),
            arrays=len(self.structure),
            merged_slices=sum(a.num_slices for a in self.adapters),
            copied=[assets],
            block=block,
        )


def plan_merge(
    source: sources.ParamSource,
    lora: LoRASource | ResolvedLoRA | None,
    options: engine.MergeOptions,
    *,
    source_info: dict[str, Any],
    save_assets: Callable[[pathlib.Path], None] | None = None,
    run_config: Any | None = None,
    on_plan: Callable[[list[_adapters.Adapter]], None] | None = None,
) -> MergePlan:
    """The pipeline, first half, for every entry point (offline merge, export of a LoRA step, merge on save): reads
    the structure (not the arrays), resolves the LoRA config, pairs adapters, finds and checks the serving config."""
    resolved = lora if isinstance(lora, ResolvedLoRA) else resolve_lora(source.tree, lora or LoRASource())
    adapters = engine.plan(source.tree, resolved)
    if on_plan is not None:
        on_plan(adapters)
    structure = engine.merged_structure(source.tree, adapters, options)
    serving_config = serving_for(resolved, structure, run_config)
    return MergePlan(source, resolved, adapters, options, serving_config, structure, source_info, save_assets)


def write_merge(
    directory: pathlib.Path,
    plan: MergePlan,
    output_path: pathlib.Path,
    *,
    progress: engine.ProgressFn | None = None,
    host_buffer_bytes: int = orbax_stream.MAX_INFLIGHT_BYTES,
) -> tuple[dict[str, Any], MergeReport]:
    """The pipeline, second half: merges and writes the plan into `directory` (the caller commits it), whose final
    place is `output_path`."""
    return write_merged(
        directory,
        plan.source,
        plan.adapters,
        plan.resolved,
        plan.options,
        source_info=plan.source_info,
        output_path=output_path,
        serving_config=plan.serving_config,
        save_assets=plan.save_assets,
        progress=progress,
        host_buffer_bytes=host_buffer_bytes,
    )


def plan_step_merge(
    step_dir: pathlib.Path,
    lora: LoRASource | ResolvedLoRA | None,
    options: engine.MergeOptions,
    on_plan: Callable[[list[_adapters.Adapter]], None] | None = None,
) -> MergePlan:
    """`plan_merge` of an openpi step directory on disk (its `params/` and `assets/`)."""
    assets = step_dir / "assets"
    return plan_merge(
        sources.OrbaxSource(step_dir / "params"),
        lora,
        options,
        source_info={"step_dir": str(step_dir), "step": _step_number(step_dir), "params": str(step_dir / "params")},
        save_assets=(lambda d: _output.copy_assets(assets, d)) if assets.is_dir() else None,
        on_plan=on_plan,
    )


def protect_step(step_dir: pathlib.Path) -> output_guard.Protected:
    """The LoRA step as an output must treat it: never touched, but for the tool's own `<step>/merged*`."""
    return output_guard.Protected(step_dir, "the LoRA step", output_guard.LORA_STEP_SLOTS)


def merge_checkpoint(
    step_dir: pathlib.Path | str,
    *,
    output: pathlib.Path | str | None = None,
    lora: LoRASource | ResolvedLoRA | None = None,
    options: engine.MergeOptions | None = None,
    overwrite: bool = False,
    progress: engine.ProgressFn | None = None,
    on_plan: Callable[[list[_adapters.Adapter]], None] | None = None,
) -> CheckpointMergeResult:
    """Merges the LoRA checkpoint at `step_dir` into `<step_dir>/merged` (or `output`). Never modifies the input."""
    step_dir = pathlib.Path(step_dir).resolve()
    options = options or engine.MergeOptions()
    check_step_dir(step_dir)
    out = output_guard.check_output(
        output if output is not None else step_dir / DEFAULT_OUTPUT_NAME,
        overwrite=overwrite,
        protected=[protect_step(step_dir)],
        kind="merged",
    )
    if (step_dir / "assets").is_dir():
        _output.check_copy(step_dir / "assets", out.parent)
    plan = plan_step_merge(step_dir, lora, options, on_plan)
    needed = plan.needed_bytes(assets=step_dir / "assets", block=_output.block_size(out))
    with _output.staged_directory(out, overwrite=overwrite, needed_bytes=needed, what="the merged checkpoint") as tmp:
        manifest, report = write_merge(tmp, plan, out, progress=progress)
    logger.info("merged %d adapted weights of %s into %s", len(plan.adapters), step_dir, out)
    return CheckpointMergeResult(output=out, report=report, manifest=manifest)


def write_merged(
    directory: pathlib.Path,
    source: sources.ParamSource,
    adapters: list[_adapters.Adapter],
    resolved: ResolvedLoRA,
    options: engine.MergeOptions,
    *,
    source_info: dict[str, Any],
    output_path: pathlib.Path,
    serving_config: serving.ServingConfig,
    save_assets: Callable[[pathlib.Path], None] | None = None,
    progress: engine.ProgressFn | None = None,
    host_buffer_bytes: int = orbax_stream.MAX_INFLIGHT_BYTES,
) -> tuple[dict[str, Any], MergeReport]:
    """Writes `params/` (streamed, one layer slice at a time), `assets/` and, last, `manifest.json` into `directory`.

    `directory` is a staging directory (the caller commits it); the manifest names `output_path`, its final place.
    """
    start = time.perf_counter()
    report = MergeReport()
    structure, stream = engine.write_stream(source, adapters, options, report, progress)
    orbax_stream.save(directory / "params", structure, stream, max_inflight_bytes=host_buffer_bytes)
    if save_assets is not None:
        save_assets(directory / "assets")
    report.timings["total"] = time.perf_counter() - start
    report.timings["read_write"] = report.timings["total"] - report.timings.get("merge", 0.0)
    manifest = build_manifest(source_info, output_path, resolved, serving_config, options, report)
    return _output.write_manifest(directory, manifest), report


def build_manifest(
    source_info: dict[str, Any],
    out: pathlib.Path,
    resolved: ResolvedLoRA,
    serving_config: serving.ServingConfig,
    options: engine.MergeOptions,
    report: MergeReport,
) -> dict[str, Any]:
    return {
        **_output.manifest_head(MANIFEST_FORMAT_VERSION),
        "source": source_info,
        "output": str(out),
        **serving_config.to_json(),
        "lora_config": resolved.to_json(),
        "options": dataclasses.asdict(options),
        "dtype_policy": {
            "merged_weights": options.output_dtype,
            "other_leaves": "unchanged (bitwise, same dtype)",
        },
        **report.to_json(),
    }


def _step_number(step_dir: pathlib.Path) -> int | None:
    return int(step_dir.name) if step_dir.name.isdigit() else None
