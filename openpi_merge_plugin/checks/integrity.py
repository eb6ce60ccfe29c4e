"""Re-checking a merged checkpoint: its files and params against its manifest and, given the LoRA step it came
from, every merged layer against openpi's LoRA forward.

    merged dir -> manifest -> files (size, sha256) -> params structure -> per layer slice: stored vs LoRA forward

Inputs that cannot be verified at all (no such directory, no usable manifest) raise `IntegrityError`; everything
else is a finding in the returned `VerifyResult`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import IntegrityError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora import config_schema
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora.spec import ResolvedLoRA
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.merge import slice_ops
from openpi_merge_plugin.pipeline import checkpoint_merge

logger = logging.getLogger("openpi_merge_plugin")

ProgressFn = Callable[[str, int, int], None]  # (stage, units done in this call, stage total): "hashing" bytes,
# "checking" layer slices
Status = Literal["ok", "failed", "skipped"]
_REQUIRED = {"files": dict, "weights": list, "lora_config": dict, "options": dict, "source": dict}


@dataclasses.dataclass
class Check:
    """One group of checks: ok, failed (one problem per entry) or skipped (`detail` says why)."""

    name: str
    status: Status
    detail: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WeightCheck:
    """The equivalence check of one merged weight, per layer slice."""

    path: str
    dtype: str
    rel_err: list[float] = dataclasses.field(default_factory=list)
    allowed: list[float] = dataclasses.field(default_factory=list)  # tolerance + rounding, per slice
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "max_rel_err": max(self.rel_err, default=None), "ok": self.ok}


@dataclasses.dataclass
class VerifyResult:
    merged_dir: pathlib.Path
    checks: list[Check] = dataclasses.field(default_factory=list)
    lora_step: pathlib.Path | None = None
    lora_config: str | None = None  # where the LoRA config of the equivalence check came from
    tolerance: float | None = None
    weights: list[WeightCheck] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count)."""
        return all(c.status != "failed" for c in self.checks)

    @property
    def problems(self) -> list[str]:
        return [p for c in self.checks for p in c.problems]

    def to_json(self) -> dict[str, Any]:
        return {
            "merged_dir": str(self.merged_dir),
            "ok": self.ok,
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "problems": self.problems,
            "lora_step": None if self.lora_step is None else str(self.lora_step),
            "lora_config": self.lora_config,
            "tolerance": self.tolerance,
            "weights": [w.to_json() for w in self.weights],
        }


def verify_merged(
    merged_dir: pathlib.Path | str,
    lora_step: pathlib.Path | str | None = None,
    *,
    equivalence: bool = True,
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None = None,
    tolerance: float | None = None,
    progress: ProgressFn | None = None,
) -> VerifyResult:
    """Re-checks a merged checkpoint against its manifest and, unless `equivalence=False`, against its LoRA step.

    `lora_step` defaults to the step the manifest records, if it still exists (else the equivalence check is
    skipped). `lora` overrides the LoRA config the manifest records; `tolerance` the manifest's tolerance.
    """
    merged_dir = pathlib.Path(merged_dir).resolve()
    if lora_step is not None and not equivalence:
        raise IntegrityError("a LoRA step was given but the equivalence check was turned off (--no-lora)")
    identity = _identity(merged_dir)
    try:
        result = _verify(merged_dir, lora_step, lora, tolerance, progress, equivalence=equivalence)
    except (CheckpointError, IntegrityError, OSError) as e:
        if _identity(merged_dir) != identity:
            raise IntegrityError(_replaced(merged_dir)) from e
        raise
    if _identity(merged_dir) != identity:
        raise IntegrityError(_replaced(merged_dir))
    n = len(result.problems)
    logger.info("verified %s: %s", merged_dir, "ok" if result.ok else f"{n} problem{'s' if n != 1 else ''}")
    return result


def _identity(merged_dir: pathlib.Path) -> tuple | None:
    """What tells a directory from another put at its path (an --overwrite): its inode, its manifest's."""
    try:
        directory, manifest = os.stat(merged_dir), os.stat(merged_dir / _output.MANIFEST)
    except OSError:
        return None
    return directory.st_dev, directory.st_ino, manifest.st_ino, manifest.st_mtime_ns, manifest.st_size


def _replaced(merged_dir: pathlib.Path) -> str:
    return (
        f"{merged_dir} was replaced or changed while it was being verified (another command's --overwrite?): "
        "verify it again"
    )


def _verify(
    merged_dir: pathlib.Path,
    lora_step: pathlib.Path | str | None,
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None,
    tolerance: float | None,
    progress: ProgressFn | None,
    *,
    equivalence: bool,
) -> VerifyResult:
    manifest = read_manifest(merged_dir)
    result = VerifyResult(merged_dir)
    result.checks.append(
        Check(
            "manifest",
            "ok",
            f"format {manifest['format_version']}, {manifest.get('plugin', '?')} {manifest.get('plugin_version', '?')}"
            f", {manifest.get('created_utc', '?')}",
        )
    )
    result.checks.append(_check_files(merged_dir, manifest, progress))
    structure, merged = _check_structure(merged_dir, manifest)
    result.checks.append(structure)
    if not equivalence:
        result.checks.append(Check("equivalence", "skipped", "not requested (--no-lora)"))
    else:
        step = pathlib.Path(lora_step).resolve() if lora_step is not None else _recorded_step(merged_dir, manifest)
        if step is None:
            recorded = manifest["source"].get("step_dir")
            reason = f"the LoRA step the manifest records ({recorded}) no longer exists; pass --lora-step"
            result.checks.append(Check("equivalence", "skipped", reason))
        elif merged is None:
            result.checks.append(Check("equivalence", "skipped", "the merged params cannot be read"))
        else:
            result.checks.append(_check_equivalence(result, merged, manifest, step, lora, tolerance, progress))
    return result


def read_manifest(merged_dir: pathlib.Path) -> dict[str, Any]:
    """The manifest of a merged checkpoint, or an IntegrityError saying why there is none to check against."""
    if not merged_dir.exists():
        raise IntegrityError(f"merged checkpoint {merged_dir} does not exist")
    if not merged_dir.is_dir():
        raise IntegrityError(f"{merged_dir} is a file, not a merged checkpoint directory")
    path = merged_dir / _output.MANIFEST
    if not path.is_file():
        raise IntegrityError(_why_no_manifest(merged_dir))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({e}): truncated or edited") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != checkpoint_merge.MANIFEST_FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise IntegrityError(
            f"{path} has manifest format {version}, this version reads format {checkpoint_merge.MANIFEST_FORMAT_VERSION}"
        )
    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise IntegrityError(f"{path} has no valid {key!r} entry: not written by openpi-merge-lora, or edited")
    files_ok = all(isinstance(f, dict) and {"sha256", "bytes"} <= f.keys() for f in manifest["files"].values())
    weights_ok = all(isinstance(w, dict) and {"path", "shape", "output_dtype"} <= w.keys() for w in manifest["weights"])
    if not (files_ok and weights_ok):
        raise IntegrityError(f"{path} has malformed 'files' or 'weights' entries: not written by openpi-merge-lora")
    return manifest


def _why_no_manifest(merged_dir: pathlib.Path) -> str:
    failure = merged_dir / _output.FAILURE_MARKER
    if failure.is_file():
        try:
            error = json.loads(failure.read_text())["error"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            error = "unreadable reason"
        return f"{merged_dir}: the merge on save of this step failed ({error}); details in {failure}"
    merged_child = merged_dir / checkpoint_merge.DEFAULT_OUTPUT_NAME
    if (merged_dir / "train_state").is_dir() or (merged_child / _output.MANIFEST).is_file():
        hint = f"; its merged checkpoint is {merged_child}" if (merged_child / _output.MANIFEST).is_file() else ""
        return f"{merged_dir} is an openpi training step, not a merged checkpoint{hint}"
    if (merged_dir / "params").is_dir():
        return (
            f"{merged_dir} has params/ but no {_output.MANIFEST}: an incomplete merge or copy (the merge writes "
            f"{_output.MANIFEST} last), or not written by openpi-merge-lora"
        )
    return f"{merged_dir} is not a merged checkpoint: it has no {_output.MANIFEST} and no params/"


def _check_files(merged_dir: pathlib.Path, manifest: dict[str, Any], progress: ProgressFn | None) -> Check:
    recorded = manifest["files"]
    total = sum(p.stat().st_size for p in merged_dir.rglob("*") if p.is_file() and p.name != _output.MANIFEST)
    on_bytes = None if progress is None else (lambda n: progress("hashing", n, total))
    actual = _output.file_checksums(merged_dir, on_bytes)
    problems = []
    for rel, want in sorted(recorded.items()):
        got = actual.get(rel)
        if got is None:
            problems.append(f"missing file {rel}")
        elif got["bytes"] != want.get("bytes"):
            problems.append(f"changed file {rel}: {got['bytes']} bytes, the manifest says {want.get('bytes')}")
        elif got["sha256"] != want.get("sha256"):
            problems.append(f"changed file {rel}: its sha256 differs from the manifest")
    extra = [rel for rel in sorted(set(actual) - set(recorded)) if not orbax_compat.is_commit_marker(merged_dir, rel)]
    problems += [f"extra file {rel}: not listed in the manifest" for rel in extra]
    if problems:
        return Check("files", "failed", f"{len(problems)} of {len(recorded | actual)} files differ", problems)
    return Check("files", "ok", f"{len(recorded)} files, {total:,} bytes: sizes and sha256 as recorded")


def _check_structure(merged_dir: pathlib.Path, manifest: dict[str, Any]) -> tuple[Check, sources.OrbaxSource | None]:
    params_dir = merged_dir / "params"
    if not params_dir.is_dir():
        return Check("structure", "failed", "no params", [f"{merged_dir} has no params/ directory"]), None
    try:
        source = sources.OrbaxSource(params_dir)
    except CheckpointError as e:
        return Check("structure", "failed", "params unreadable", [str(e)]), None
    tree = source.tree
    problems = []
    if lora_leaves := [p for p in tree if _adapters.is_lora_path(p)]:
        problems.append(f"LoRA leaves left in the merged params: {', '.join(lora_leaves)}")
    weights = manifest["weights"]
    for w in weights:
        sd = tree.get(w["path"])
        if sd is None:
            problems.append(f"merged weight {w['path']} is missing from the params")
        elif list(sd.shape) != list(w["shape"]) or sd.dtype != w["output_dtype"]:
            problems.append(
                f"merged weight {w['path']} is {list(sd.shape)} {sd.dtype}, "
                f"the manifest says {list(w['shape'])} {w['output_dtype']}"
            )
    passthrough = manifest.get("passthrough_leaves")
    if passthrough is not None and len(tree) != len(weights) + passthrough:
        problems.append(
            f"the params hold {len(tree)} leaves, the manifest says {len(weights) + passthrough} "
            f"({len(weights)} merged + {passthrough} passed through)"
        )
    if problems:
        return Check("structure", "failed", f"{len(problems)} problems", problems), source
    dtypes = ", ".join(sorted({w["output_dtype"] for w in weights}))
    detail = f"{len(tree)} leaves, no LoRA leaves, {len(weights)} merged weights ({dtypes}) as recorded"
    return Check("structure", "ok", detail), source


def _recorded_step(merged_dir: pathlib.Path, manifest: dict[str, Any]) -> pathlib.Path | None:
    """The LoRA step the manifest records, if it still exists; or, for the default layout <step>/merged moved as a
    whole, the step that holds `merged_dir` now."""
    step_dir = manifest["source"].get("step_dir")
    if step_dir is None:
        return None
    recorded = pathlib.Path(step_dir)
    if (recorded / "params").is_dir():
        return recorded
    was_default = manifest.get("output") == str(recorded / checkpoint_merge.DEFAULT_OUTPUT_NAME)
    if (
        was_default
        and merged_dir.name == checkpoint_merge.DEFAULT_OUTPUT_NAME
        and (merged_dir.parent / "params").is_dir()
    ):
        return merged_dir.parent
    return None


def _resolve_lora(
    tree: dict[str, _adapters.ShapeDtype],
    manifest: dict[str, Any],
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None,
) -> ResolvedLoRA:
    if isinstance(lora, ResolvedLoRA):
        return lora
    if lora is not None:
        return checkpoint_merge.resolve_lora(tree, lora)
    recorded = config_schema.read_recorded(manifest["lora_config"])
    config_schema.check_against(recorded.experts, tree, "the LoRA config the manifest records")
    return dataclasses.replace(recorded, source=f"recorded in the manifest ({recorded.source})")


def _check_equivalence(
    result: VerifyResult,
    merged: sources.OrbaxSource,
    manifest: dict[str, Any],
    step: pathlib.Path,
    lora: checkpoint_merge.LoRASource | ResolvedLoRA | None,
    tolerance: float | None,
    progress: ProgressFn | None,
) -> Check:
    source = sources.OrbaxSource(checkpoint_merge.check_step_dir(step))
    resolved = _resolve_lora(source.tree, manifest, lora)
    adapters = engine.plan(source.tree, resolved)
    options = manifest["options"]
    tolerance = float(options.get("tolerance", engine.MergeOptions.tolerance) if tolerance is None else tolerance)
    strength = float(options.get("strength", 1.0))
    seed = int(options.get("seed", 0))
    result.lora_step, result.lora_config, result.tolerance = step, resolved.source, tolerance

    problems = []
    recorded = {w["path"] for w in manifest["weights"]}
    planned = {a.base_path for a in adapters}
    problems += [
        f"LoRA step {step} has an adapter on {p}, but the manifest does not list it as merged"
        for p in sorted(planned - recorded)
    ]
    problems += [f"merged weight {p} has no adapter in LoRA step {step}" for p in sorted(recorded - planned)]
    todo = [a for a in adapters if a.base_path in recorded and a.base_path in merged.tree]
    total = sum(a.num_slices for a in todo)
    for adapter in todo:
        check = _check_weight(source, merged, adapter, adapter.scale * strength, tolerance, seed)
        result.weights.append(check)
        if check.problem is not None:
            problems.append(check.problem)
        if progress is not None:
            progress("checking", adapter.num_slices, total)
    if problems:
        return Check("equivalence", "failed", f"{len(problems)} problems against the LoRA step {step}", problems)
    worst = max((e for w in result.weights for e in w.rel_err), default=0.0)
    rounding = " + bfloat16 rounding" if any(w.dtype == "bfloat16" for w in result.weights) else ""
    detail = (
        f"{len(todo)} weights, {total} layer slices reproduce the LoRA forward "
        f"(max rel err {worst:.2e}, tolerance {tolerance:.0e}{rounding})"
    )
    return Check("equivalence", "ok", detail)


def _check_weight(
    source: sources.OrbaxSource,
    merged: sources.OrbaxSource,
    adapter: _adapters.Adapter,
    factor: float,
    tolerance: float,
    seed: int,
) -> WeightCheck:
    """Checks one merged weight, slice by slice, reading its base and merged copy a layer slice at a time."""
    path = adapter.base_path
    arrays = sources.AdapterArrays(source, adapter)  # as the merge reads them; the merged weight a slice at a time
    w = arrays.w
    check = WeightCheck(path=path, dtype=merged.tree[path].dtype)
    try:
        stored = merged.sliced(path)
    except CheckpointError as e:
        check.problem = f"cannot read merged weight {path}: {e}"
        return check
    if stored.shape != w.shape:
        check.problem = f"merged weight {path} is {list(stored.shape)} but its LoRA base weight {list(w.shape)}"
        return check
    layer_eqns = eq.to_letters(adapter.delta.layer_equation, *adapter.delta.lora_equations)
    # The merge's seed recipe, but drawn by numpy on the host: fresh probes, independent of the merge's own.
    n_lead = len(adapter.lead_shape)
    failed: list[tuple[Any, float, float, bool]] = []
    for flat_index, index, w_slice, a_slice, b_slice in arrays.slices():
        try:
            stored_slice = stored[index]
        except CheckpointError as e:
            check.problem = f"cannot read merged weight {path}: {e}"
            return check
        rng = np.random.default_rng(slice_ops.probe_seed(seed, path, flat_index))
        stats = slice_ops.check_slice(
            stored_slice,
            w_slice,
            a_slice,
            b_slice,
            jnp.float32(factor),
            slice_ops.host_probe(rng, layer_eqns[0], w_slice.shape),
            delta_eqn=adapter.delta.equation,
            layer_eqns=layer_eqns,
        )
        rel_err = float(stats["rel_err"])
        # A bfloat16 merged weight is the exact merge rounded to 8 significant bits, which alone moves the probe
        # output by ~2e-3 (the manifest's `rel_err_stored`; `rel_err` of float32 outputs is ~5e-7). So the slice
        # may be off by what rounding a correct merge to the stored dtype costs on this same probe, plus the
        # tolerance: a weight off by more than the tolerance fails in any dtype. For float32 the rounding is 0.
        allowed = tolerance + float(stats["rounding"])
        check.rel_err.append(rel_err)
        check.allowed.append(allowed)
        finite = bool(stats["finite"])
        if not (finite and rel_err <= allowed):
            failed.append((index[0] if n_lead == 1 else index, rel_err, allowed, finite))
    if not failed:
        return check
    layers = f" in layers {[f[0] for f in failed]}" if len(failed) > 1 else ""
    if nonfinite := [f[0] for f in failed if not f[3]]:
        where = f" in layers {nonfinite}" if n_lead else ""
        check.problem = f"merged weight {path} has non-finite values (NaN/Inf){where}"
        return check
    layer, rel_err, allowed, _ = max(failed, key=lambda f: f[1] - f[2])
    where = f" (layer {layer})" if n_lead else ""
    check.problem = (
        f"merged weight {path}{where} does not reproduce the LoRA forward{layers}: "
        f"max relative error {rel_err:.3e} > allowed {allowed:.3e}"
    )
    return check
