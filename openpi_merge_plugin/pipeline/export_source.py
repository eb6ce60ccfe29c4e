"""What `export SRC` reads, told apart by structure, and where its output may go.

- a merged checkpoint (`params/` and our `manifest.json`): read as it is;
- a LoRA step (a directory whose `params/` holds `lora_*` leaves): merged on the way, in the export's one pass, one
  layer slice at a time and verified as `merged/` is (or, for a format that writes the adapters themselves, a PEFT
  adapter, read as it is, with its adapters paired: the only source such a format takes);
- any other openpi checkpoint (a non-LoRA train step, EMA or not: `save_state` writes the EMA params as `params`; a
  released checkpoint as openpi downloads it, `<name>/params` + `<name>/assets`): read as it is, the identity;
- the `params/` item of either, given itself: its checkpoint is the directory holding it.

The default output is the LoRA step's slot for the format (`<step>/merged_<format>` for a LoRA step merged on the
way, `<step>/lerobot_peft` for its adapter), `<merged>_<format>` beside a merged checkpoint and `<checkpoint>/<format>`
inside any other; an output is never the source, around it or inside it but for that name, nor a directory the
format reads (`reads`: a local BASE), around it or inside it (`checkpoint/output_guard`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import json
import pathlib
from typing import Any, Literal

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import config_schema
from openpi_merge_plugin.lora.adapters import Adapter
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.lora.adapters import is_lora_path
from openpi_merge_plugin.lora.configs import LoRASource
from openpi_merge_plugin.lora.spec import ResolvedLoRA
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.options import MergeOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export_stream

Kind = Literal["lora_step", "merged", "checkpoint"]


@dataclasses.dataclass(frozen=True)
class ExportSource:
    """What the export's one pass reads, where it writes, and what the manifest says of it."""

    kind: Kind
    params: sources.ParamSource
    structure: dict[str, ShapeDtype]  # of what the pass yields: the merged params, or the leaves as they are
    assets: pathlib.Path | None  # where the checkpoint's assets/ (openpi's norm stats) are, if it has them
    record: dict[str, Any]  # a merge's manifest, or what the merge on the way records (LoRA and serving config)
    info: dict[str, Any]  # the manifest's `source`
    output: pathlib.Path  # where the export goes (checked)
    merge: export_stream.Merge | None = None  # the merge on the way; None: the identity
    adapters: tuple[Adapter, ...] = ()  # a LoRA step's adapters, merged on the way or not
    lora: ResolvedLoRA | None = None  # their configs


def open_source(
    src: pathlib.Path | str,
    *,
    name: str,
    merged: bool = True,
    output: pathlib.Path | str | None = None,
    overwrite: bool = False,
    lora: LoRASource | None = None,
    reads: Callable[[], Sequence[tuple[pathlib.Path, str]]] = tuple,
) -> ExportSource:
    """Reads `src`'s structure (no arrays), plans its merge (a LoRA step, when `merged`) or the identity, and checks
    the output (`name`: the format's; `reads()`: the directories the format reads, and what to call them), all
    before any work."""
    src = pathlib.Path(src).resolve()
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    read = [output_guard.Protected(path, what) for path, what in reads()]
    if (src / _output.MANIFEST).is_file() and (src / "params").is_dir():
        if not merged:
            raise ConfigError(
                f"{src} is a merged checkpoint: --format {name} writes a LoRA step's adapters; give the step"
            )
        if lora is not None and lora.given and lora.config is None:
            raise ConfigError(f"{src} is a merged checkpoint: --lora-config/--alpha are for a LoRA step")
        default = src.parent / f"{src.name}_{name}"
        out = output_guard.check_output(
            _or(output, default), overwrite=overwrite, protected=[*protected_for_merged(src), *read], kind=name
        )
        return merged_source(src, out)
    if _is_params_item(src):
        directory, params_dir = src.parent, src
    else:
        directory, params_dir = src, checkpoint_merge.check_step_dir(src)
    params = sources.OrbaxSource(params_dir)
    assets = directory / "assets"
    info = {"params": str(params_dir), "step": int(directory.name) if directory.name.isdigit() else None}
    if not any(is_lora_path(p) for p in params.tree):
        if not merged:
            raise ConfigError(f"{src} has no LoRA adapters: --format {name} writes a LoRA step's adapters")
        if lora is not None and lora.given and lora.config is None:
            raise ConfigError(f"{src} has no LoRA adapters: --lora-config/--alpha/--rslora are for a LoRA step")
        default = directory / name
        protected = [output_guard.Protected(directory, "the checkpoint", (name,)), *read]
        out = output_guard.check_output(_or(output, default), overwrite=overwrite, protected=protected, kind=name)
        info = {"kind": "checkpoint", "checkpoint": str(directory), **info, "merged_on_the_way": False}
        return ExportSource("checkpoint", params, dict(params.tree), assets, {}, info, out)
    default = directory / output_guard.lora_step_slot(name)
    protected = [checkpoint_merge.protect_step(directory), *read]
    out = output_guard.check_output(_or(output, default), overwrite=overwrite, protected=protected, kind=name)
    planned = checkpoint_merge.plan_merge(
        params, lora, MergeOptions(), source_info={"step_dir": str(directory), **info}
    )
    info = {"kind": "lora_step", "lora_step": str(directory), **info, "merged_on_the_way": merged}
    record = {"lora_config": planned.resolved.to_json(), **planned.serving_config.to_json()}
    return ExportSource(
        "lora_step",
        params,
        planned.structure if merged else dict(params.tree),
        assets,
        record,
        info,
        out,
        export_stream.Merge(planned.adapters, planned.options) if merged else None,
        tuple(planned.adapters),
        planned.resolved,
    )


def merged_source(
    merged_dir: pathlib.Path, output: pathlib.Path, source_info: dict[str, Any] | None = None
) -> ExportSource:
    """A merged directory, read as it is (merge on save's exports give its final place in `source_info`)."""
    manifest = json.loads((merged_dir / _output.MANIFEST).read_text())
    info = {
        "kind": "merged",
        **(source_info or {"merged": str(merged_dir), "merged_on_the_way": False}),
        "step": manifest.get("source", {}).get("step"),
        "merged_manifest_sha256": _output.sha256_of(merged_dir / _output.MANIFEST),
    }
    params = sources.OrbaxSource(merged_dir / "params")
    assets = merged_dir / "assets"
    return ExportSource("merged", params, dict(params.tree), assets, manifest, info, output)


def step_params_source(
    params: sources.ParamSource, merged_dir: pathlib.Path, output: pathlib.Path, source_info: dict[str, Any]
) -> ExportSource:
    """Merge on save's source for a format that writes the adapters themselves: the step's params as the merge just
    read them (the live train state, or its host copy), their adapters paired under the LoRA config that merge
    recorded in `merged_dir`, and the norm stats it saved there."""
    manifest = json.loads((merged_dir / _output.MANIFEST).read_text())
    resolved = config_schema.read_recorded(manifest["lora_config"])
    adapters = engine.plan(params.tree, resolved)
    record = {k: manifest.get(k) for k in ("lora_config", "serving_config", "serving_config_reason")}
    info = {"kind": "lora_step", **source_info, "step": manifest.get("source", {}).get("step")}
    info["merged_on_the_way"] = False
    assets = merged_dir / "assets"
    return ExportSource(
        "lora_step", params, dict(params.tree), assets, record, info, output, None, tuple(adapters), resolved
    )


def protected_for_merged(merged_dir: pathlib.Path) -> list[output_guard.Protected]:
    """A merged directory, and the LoRA step it came from (as its manifest records it, or as its parent)."""
    protected = [output_guard.Protected(merged_dir, "the merged checkpoint")]
    try:
        recorded = json.loads((merged_dir / _output.MANIFEST).read_text()).get("source", {}).get("step_dir")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded and pathlib.Path(recorded).is_dir():
        protected.append(
            output_guard.Protected(pathlib.Path(recorded), "the LoRA step of this merge", output_guard.LORA_STEP_SLOTS)
        )
    if (merged_dir.parent / "params").is_dir():
        protected.append(checkpoint_merge.protect_step(merged_dir.parent))
    return protected


def _is_params_item(path: pathlib.Path) -> bool:
    """An Orbax checkpoint item itself (a step's `params/`), not a directory holding one."""
    return not (path / "params").is_dir() and any((path / f).is_file() for f in ("_METADATA", "manifest.ocdbt"))


def _or(output: pathlib.Path | str | None, default: pathlib.Path) -> pathlib.Path | str:
    return output if output is not None else default
