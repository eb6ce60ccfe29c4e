"""The one export pipeline: source → merge or identity → format → streamed write → read back → manifest.

`export(src, to)` takes any openpi checkpoint and writes one format's directory (`formats/`: openpi's PyTorch
checkpoint, LeRobot's policy, a LeRobot PEFT adapter of a LoRA step), each stage one module, entered once, in this
order:
1. `export_source`: what SRC is (a LoRA step, a merged checkpoint, a plain checkpoint or its `params/`), its
   structure, the merge on the way (a LoRA step's) or the identity, and where the output may go;
2. `model_facts`: what the params cannot tell (action horizon, token length, dtype, norm stats), from a config, the
   options or openpi's defaults;
3. the format's `plan`: every tensor (name, dtype, shape, recipe) and the files beside them (a plan that must
   compare values first, a PEFT adapter's local BASE, reads them with the pass's own reader, `PlanInput.values`);
4. `export_stream.write`: one pass over the params, each leaf read once (merged per layer slice), laid out and
   written at its offset, hashed; `export_stream.read_back`: everything read back against those hashes, then the
   format's own check of what it wrote;
5. `checkpoint/output`: the manifest, last, and the atomic commit.
Everything that can be refused is refused in 1-3, before the pass. The source is never modified.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import time
from typing import Any

from openpi_merge_plugin import formats as _formats
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.formats import base
from openpi_merge_plugin.formats.base import MODEL_OPTIONS
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.formats.base import ModelFacts
from openpi_merge_plugin.lora.configs import LoRASource
from openpi_merge_plugin.pipeline import export_source
from openpi_merge_plugin.pipeline import export_stream
from openpi_merge_plugin.pipeline import model_facts

logger = logging.getLogger("openpi_merge_plugin")

FORMAT_VERSION = 1
ProgressFn = export_stream.ProgressFn


@dataclasses.dataclass(frozen=True)
class ExportResult:
    output: pathlib.Path
    manifest: dict[str, Any]


def export(
    src: pathlib.Path | str,
    to: str | base.Format = "pytorch",
    *,
    options: ExportOptions | None = None,
    config: str | Any | None = None,
    lora: LoRASource | None = None,
    output: pathlib.Path | str | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Writes the openpi checkpoint `src` in the format `to` (a name of `formats.FORMATS`, or a `Format`), as the
    module docstring says; returns where, and the manifest.

    `config`: an openpi TrainConfig (a registered name, or the config itself) that says what the params cannot (needs
    openpi for a name); for a LoRA step a name is also its LoRA config, unless `lora` says where that comes from (default: inferred from openpi's shipped variants).
    Default output:
    `<step>/merged_<format>` for a LoRA step, `<merged>_<format>` beside a merged checkpoint, `<checkpoint>/<format>`
    inside any other. Atomic: a temporary sibling, the manifest last, then a rename.
    """
    fmt = _formats.FORMATS[to] if isinstance(to, str) else to
    options = options or ExportOptions()
    if lora is None and isinstance(config, str):
        lora = LoRASource(config=config)
    source = export_source.open_source(
        src,
        name=fmt.name,
        merged=fmt.merged,
        output=output,
        overwrite=overwrite,
        lora=lora,
        reads=functools.partial(fmt.reads, options),
    )
    facts = model_facts.resolve(source.structure, source.record, source.assets, config=config, options=options)
    plan = fmt.plan(_plan_input(source, facts, options, what=str(src)))
    needed = export_stream.disk_needed(plan, source.output)
    with _output.staged_directory(source.output, overwrite=overwrite, needed_bytes=needed, what="the export") as tmp:
        manifest = _write(tmp, source, facts, plan, fmt, options, progress)
    logger.info("exported %s as %s to %s (%s)", src, fmt.name, source.output, plan.precision)
    return ExportResult(source.output, manifest)


def write_beside_merge(
    directory: pathlib.Path,
    merged_dir: pathlib.Path,
    to: str | base.Format,
    train_config: Any,
    options: ExportOptions,
    output_path: pathlib.Path,
    *,
    source_info: dict[str, Any] | None = None,
    params: Any = None,
) -> dict[str, Any]:
    """Merge on save's export: writes the files (format `to`) of the merge just staged in `merged_dir` into `directory`
    (staged and committed by the caller, whose final place is `output_path`), the model facts from the run's own
    TrainConfig. The same stages as `export`, from a merged checkpoint; for a format that writes the adapters
    themselves (`merged=False`), from the step's `params` the merge read (a `sources.ParamSource`), its adapters
    paired as the merge recorded them."""
    fmt = _formats.FORMATS[to] if isinstance(to, str) else to
    if fmt.merged:
        source = export_source.merged_source(merged_dir, output_path, source_info)
    else:
        source = export_source.step_params_source(params, merged_dir, output_path, source_info or {})
    facts = model_facts.resolve(source.structure, source.record, source.assets, config=train_config, options=options)
    plan = fmt.plan(_plan_input(source, facts, options, what=str(source.info.get("merged", merged_dir))))
    return _write(directory, source, facts, plan, fmt, options, None)


def _plan_input(
    source: export_source.ExportSource, facts: ModelFacts, options: ExportOptions, *, what: str
) -> base.PlanInput:
    values = functools.partial(export_stream.laid_out_tensors, source.params)
    return base.PlanInput(source.structure, facts, options, source.assets, source.adapters, source.lora, what, values)


def _write(
    directory: pathlib.Path,
    source: export_source.ExportSource,
    facts: ModelFacts,
    plan: base.FormatPlan,
    fmt: base.Format,
    options: ExportOptions,
    progress: ProgressFn | None,
) -> dict[str, Any]:
    """The pass, the read back and, last, the manifest, into `directory`."""
    start = time.perf_counter()
    written = export_stream.write(directory, plan, source.params, source.merge, progress)
    readback, known, checked = export_stream.read_back(directory, plan, written, source.params)
    merged = written.merge if written.merge is not None else _merge_record(source)
    verification = {"merge": merged, "file": readback, **checked}
    manifest = _manifest(source, facts, plan, fmt, options, verification, time.perf_counter() - start)
    return _output.write_manifest(directory, manifest, known=known)


def _manifest(
    source: export_source.ExportSource,
    facts: ModelFacts,
    plan: base.FormatPlan,
    fmt: base.Format,
    options: ExportOptions,
    verification: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """What was exported, from what, how, and the checks; the format adds its own part (`plan.manifest`)."""
    own = dict(plan.manifest)
    version = {"lerobot_version": own.pop("lerobot_version")} if "lerobot_version" in own else {}
    files_used, checks = own.pop("source", {}), own.pop("verification", {})
    return {
        **_output.manifest_head(FORMAT_VERSION),
        "format": fmt.name,
        **version,
        "source": {**source.info, **_files_used(source, files_used)},
        "output": str(source.output),
        "serving_config": source.record.get("serving_config"),
        "serving_config_reason": source.record.get("serving_config_reason"),
        "lora_config": source.record.get("lora_config"),
        "model_facts": {k: v for k, v in facts.origin.items() if k not in MODEL_OPTIONS or _reads(fmt, k)},
        **own,
        "precision": plan.precision,
        "tensors": len(plan.tensors),
        "files_written": [plan.model_file, *plan.files, *plan.copies],
        "verification": {**verification, **checks},
        "seconds": round(seconds, 3),
    }


def _reads(fmt: base.Format, option: str) -> bool:
    """Whether the format reads this model option (the action horizon: every format)."""
    return option == "action_horizon" or option in fmt.options


def _files_used(source: export_source.ExportSource, files: dict[str, Any]) -> dict[str, Any]:
    """Files a format read (the norm stats): relative to the checkpoint where they are its own, with their sha256."""
    out = {}
    checkpoint = source.assets.parent if source.assets is not None else None
    for key, given in files.items():
        path = pathlib.Path(given)
        inside = checkpoint is not None and path.is_relative_to(checkpoint)
        out[key] = str(path.relative_to(checkpoint) if inside else path)
        out[f"{key}_sha256"] = _output.sha256_of(path)
    return out


def _merge_record(source: export_source.ExportSource) -> dict[str, Any]:
    """Without a merge on the way: the merged directory's verification, or that nothing was merged."""
    if source.kind == "merged":
        return {k: source.record.get(k) for k in ("verified", "max_rel_err") if k in source.record}
    if source.adapters:
        return {"merged": False, "identity": f"the format lays out the {len(source.adapters)} LoRA adapters themselves"}
    return {"merged": False, "identity": "no LoRA adapters: the leaves are exported as they are"}
