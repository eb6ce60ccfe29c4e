"""What a LoRA step or a merged checkpoint holds: per adapted weight, its LoRA config and how large its update is.

    LoRA step:  plan adapters -> per weight, per layer slice: ||dW|| / ||W|| and bf16 survival (the merge kernel)
    merged dir: the same numbers from manifest.json, plus a fresh check of its file checksums

A LoRA step is read one weight at a time (a base weight a layer slice at a time, through its decoded chunks), so
memory stays at about one weight whatever the checkpoint size.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import logging
import pathlib
import statistics
from typing import Any, Literal

from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora.configs import ResolvedLoRA
from openpi_merge_plugin.merge import delta_stats
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.merge.report import AdaptedWeight
from openpi_merge_plugin.merge.report import WeightReport
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.serving.names import ServingConfig

logger = logging.getLogger("openpi_merge_plugin")

# Manifest keys shown as the merged checkpoint's "manifest"; weights and files are reported on their own.
_MANIFEST_OWN_KEYS = ("weights", "files")


@dataclasses.dataclass
class WeightStats(AdaptedWeight):
    """One adapted weight: its LoRA config, and per layer ||dW|| / ||W|| and the fraction of ||dW|| bf16 keeps."""

    delta_rel_norm: tuple[float, ...]
    bf16_survival: tuple[float, ...]

    @property
    def name(self) -> str:
        """Short display name, e.g. `attn/q_einsum_1` or `mlp/linear`."""
        return self.path.removeprefix("PaliGemma/llm/layers/").removesuffix("/w")

    @classmethod
    def from_report(cls, w: WeightReport) -> WeightStats:
        return cls(
            **w.adapted_weight_fields(),
            delta_rel_norm=tuple(w.delta_rel_norm),
            bf16_survival=tuple(w.bf16_survival),
        )

    @classmethod
    def from_manifest(cls, w: dict[str, Any]) -> WeightStats:
        return cls(
            **AdaptedWeight.fields_from_json(w),
            delta_rel_norm=tuple(map(float, w["delta_rel_norm"])),
            bf16_survival=tuple(map(float, w["bf16_survival"])),
        )

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["delta_rel_norm"] = list(self.delta_rel_norm)
        out["bf16_survival"] = list(self.bf16_survival)
        out["layers"] = len(self.delta_rel_norm)
        out["delta_rel_norm_stats"] = min_median_max(self.delta_rel_norm)
        out["bf16_survival_stats"] = min_median_max(self.bf16_survival)
        return out


@dataclasses.dataclass(frozen=True)
class ChecksumStatus:
    """A merged checkpoint's files against the sha256 sums its manifest recorded."""

    files: int  # files the manifest lists
    mismatched: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.extra)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(self).items()}}


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What `inspect_checkpoint` found."""

    path: pathlib.Path
    kind: Literal["lora", "merged"]
    step: int | None
    weights: tuple[WeightStats, ...]
    lora_config: dict[str, Any]  # as the manifest records it (`ResolvedLoRA.to_json()`)
    serving: ServingConfig  # what serves the merged checkpoint (for a LoRA step: what a merge would record)
    manifest: dict[str, Any] | None = None  # merged only: the manifest without its weights and files
    checksums: ChecksumStatus | None = None  # merged only; None if not checked

    @property
    def experts(self) -> list[int]:
        return sorted({w.expert for w in self.weights})

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "step": self.step,
            **self.serving.to_json(),
            "lora_config": self.lora_config,
            "manifest": self.manifest,
            "checksums": None if self.checksums is None else self.checksums.to_json(),
            "weights": [w.to_json() for w in self.weights],
        }


def min_median_max(values: tuple[float, ...] | list[float]) -> dict[str, float | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def detect(path: pathlib.Path) -> Literal["lora", "merged"]:
    """Returns "merged" for a directory with manifest.json, "lora" for an openpi step directory; else raises."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if (path / _output.MANIFEST).is_file():
        return "merged"
    try:
        checkpoint_merge.check_step_dir(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{path} is neither an openpi LoRA checkpoint step (no params/) nor a merged checkpoint "
            f"(no {_output.MANIFEST}): {e}"
        ) from None
    return "lora"


def inspect_checkpoint(
    path: pathlib.Path | str,
    *,
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None = None,
    checksums: bool = True,
    progress: delta_stats.ProgressFn | None = None,
    on_plan: Callable[[list[_adapters.Adapter]], None] | None = None,
) -> Inspection:
    """Inspects an openpi LoRA step directory or a merged checkpoint directory (see the module docstring).

    `lora` says where the LoRA config comes from, as for a merge; a merged checkpoint uses its manifest instead.
    `checksums=False` skips re-hashing a merged checkpoint's files (which reads all of them).
    """
    path = pathlib.Path(path)
    if detect(path) == "merged":
        if lora is not None:
            logger.warning(
                "%s is a merged checkpoint: its manifest gives the LoRA config, the options are ignored", path
            )
        return _inspect_merged(path, checksums=checksums)
    return _inspect_lora(path, lora, progress, on_plan)


def _inspect_lora(
    step_dir: pathlib.Path,
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None,
    progress: delta_stats.ProgressFn | None,
    on_plan: Callable[[list[_adapters.Adapter]], None] | None,
) -> Inspection:
    source = sources.OrbaxSource(checkpoint_merge.check_step_dir(step_dir))
    resolved = (
        lora
        if isinstance(lora, ResolvedLoRA)
        else checkpoint_merge.resolve_lora(source.tree, lora or checkpoint_merge.LoRASource())
    )
    adapters = engine.plan(source.tree, resolved)
    if on_plan is not None:
        on_plan(adapters)
    weights = [WeightStats.from_report(delta_stats.measure(source, a, progress)) for a in adapters]
    logger.info("inspected %d adapted weights of %s", len(weights), step_dir)
    return Inspection(
        path=step_dir,
        kind="lora",
        step=int(step_dir.name) if step_dir.name.isdigit() else None,
        weights=tuple(sorted(weights, key=lambda w: (w.expert, w.path))),
        lora_config=resolved.to_json(),
        serving=checkpoint_merge.serving_for(
            resolved, engine.merged_structure(source.tree, adapters, engine.MergeOptions())
        ),
    )


def _inspect_merged(root: pathlib.Path, *, checksums: bool) -> Inspection:
    manifest_path = root / _output.MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        weights = [WeightStats.from_manifest(w) for w in manifest["weights"]]
        recorded = manifest["files"]
        step = manifest.get("source", {}).get("step")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is not a readable merge manifest: {e!r}") from e
    return Inspection(
        path=root,
        kind="merged",
        step=step,
        weights=tuple(sorted(weights, key=lambda w: (w.expert, w.path))),
        lora_config=manifest.get("lora_config") or {},
        serving=ServingConfig(
            manifest.get("serving_config"), manifest.get("serving_config_reason") or "none recorded in the manifest"
        ),
        manifest={k: v for k, v in manifest.items() if k not in _MANIFEST_OWN_KEYS},
        checksums=check_files(root, recorded) if checksums else None,
    )


def check_files(root: pathlib.Path, recorded: dict[str, dict[str, Any]]) -> ChecksumStatus:
    """Re-hashes every file under `root` and compares with the manifest's `files`."""
    logger.info("checking the sha256 of %d files under %s", len(recorded), root)
    found = _output.file_checksums(root)
    return ChecksumStatus(
        files=len(recorded),
        mismatched=tuple(sorted(p for p in recorded if p in found and found[p] != recorded[p])),
        missing=tuple(sorted(p for p in recorded if p not in found)),
        extra=tuple(sorted(p for p in found if p not in recorded and not orbax_compat.is_commit_marker(root, p))),
    )
