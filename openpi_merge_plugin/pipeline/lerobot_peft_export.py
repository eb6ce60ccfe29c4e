"""Write an openpi LoRA step as a PEFT LoRA adapter that LeRobot 0.6.1 loads on a base policy (`use_peft`).

The directory LeRobot's `make_policy` reads with `--policy.use_peft=true --policy.path=DIR` (and its own training
writes): `adapter_config.json` (PEFT's `LoraConfig`, `base_model_name_or_path` = BASE), `adapter_model.safetensors`
(the LoRA factors, `lerobot_peft_layout` / `peft_adapter`, and the modules to save), LeRobot's `config.json` with
`use_peft: true` and the processors with the step's norm stats (`lerobot_files`, as the LeRobot export writes
them), and `manifest.json`; committed atomically.

BASE is a LeRobot policy directory of the step's base weights (`export --format lerobot` of the base checkpoint) or
a hub id. A local BASE is read whole and compared, tensor by tensor and bitwise, with what the step's own weights
would export: a frozen or adapted weight that differs is refused (the fine-tune did not start from that BASE), a
trained one that differs goes in `modules_to_save`, one that does not is left to BASE. For a hub id, the trained
tensors are read off the step's structure (`lerobot_peft_layout.trained_tensors`).

Standalone for now (issue 32): the export's format interface (issue 31) will call `plan_lerobot_peft` and
`write_lerobot_peft`; the command line and merge on save come with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
import struct
import time
from typing import Any

import numpy as np

from openpi_merge_plugin.checkpoint import lerobot_files as files
from openpi_merge_plugin.checkpoint import lerobot_layout
from openpi_merge_plugin.checkpoint import lerobot_peft_layout as peft_layout
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import output_guard
from openpi_merge_plugin.checkpoint import pytorch_layout as layout
from openpi_merge_plugin.checkpoint import safetensors_stream
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora import peft_adapter
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export_model
from openpi_merge_plugin.pipeline import export_stream
from openpi_merge_plugin.pipeline import lerobot_export
from openpi_merge_plugin.pipeline import pytorch_export

logger = logging.getLogger("openpi_merge_plugin")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_MODEL = "adapter_model.safetensors"
DEFAULT_OUTPUT_NAME = "lerobot_peft"
FORMAT_VERSION = 1
# What the factors must reproduce: PEFT's LoRA term against openpi's (its two LoRA einsums), on random probes,
# relative to openpi's largest output (float32 factors; measured ~1e-7).
FACTOR_TOLERANCE = 1e-5
PROBES = 4  # random inputs per target and layer for that check
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclasses.dataclass(frozen=True)
class BaseRef:
    """The base policy the adapter loads on: `base_model_name_or_path` and, for a local directory, the directory."""

    name_or_path: str
    local: pathlib.Path | None
    revision: str | None = None

    @classmethod
    def parse(cls, base: str | pathlib.Path, revision: str | None = None) -> BaseRef:
        """A local LeRobot policy directory (config.json and model.safetensors) or a hub id `owner/name`."""
        path = pathlib.Path(base).expanduser()
        if path.exists():
            path = path.resolve()
            missing = [n for n in ("config.json", lerobot_export.MODEL_FILE) if not (path / n).is_file()]
            if missing:
                raise ConfigError(f"--base {path} is not a LeRobot policy directory: it has no {', '.join(missing)}")
            if revision is not None:
                raise ConfigError("--base-revision applies to a hub id, not to a local --base directory")
            return cls(str(path), path)
        if isinstance(base, str) and _HUB_ID.fullmatch(base):
            return cls(base, None, revision)
        raise ConfigError(f"--base {base}: neither a directory nor a hub id (owner/name)")

    def to_json(self) -> dict[str, Any]:
        return {
            "base_model_name_or_path": self.name_or_path,
            "local": self.local is not None,
            "revision": self.revision,
        }


@dataclasses.dataclass(frozen=True)
class PeftPlan:
    """Everything decided before the adapter is written."""

    lerobot: lerobot_export.Plan  # the merged export's plan: layout (names, dtypes), policy spec, norm stats
    adapter: peft_layout.PeftLayout
    base: BaseRef
    base_check: dict[str, Any] | None  # what the comparison with a local BASE found
    why_saved: str


def export_lerobot_peft(
    step: pathlib.Path | str,
    *,
    base: BaseRef,
    output: pathlib.Path | str | None = None,
    precision: lerobot_export.Precision | None = None,
    model: lerobot_export.LeRobotModel | None = None,
    naming: lerobot_export.Naming | None = None,
    lora: checkpoint_merge.LoRASource | None = None,
    overwrite: bool = False,
    allow_nonstandard_dims: bool = False,
    progress: pytorch_export.ProgressFn | None = None,
) -> pytorch_export.ExportResult:
    """Writes the adapter directory of a LoRA step (default `<step>/lerobot_peft`), atomically, after everything that
    can be refused was (BASE's tensors included)."""
    step_dir = pathlib.Path(step).resolve()
    checkpoint_merge.check_step_dir(step_dir)
    protected = output_guard.Protected(
        step_dir, "the LoRA step", (*output_guard.STEP_OUTPUT_NAMES, DEFAULT_OUTPUT_NAME)
    )
    target = output if output is not None else step_dir / DEFAULT_OUTPUT_NAME
    out = output_guard.check_output(target, overwrite=overwrite, protected=[protected])
    if base.local is not None:
        output_guard.check_output(out, overwrite=overwrite, protected=[output_guard.Protected(base.local, "BASE")])
    source = pytorch_export.lora_step_source(step_dir, lora)
    if model is None:
        model = export_model.from_recorded_config(
            source.record, lerobot_export.model_from_openpi, needs="action_horizon, max_token_len",
            otherwise="--action-horizon N",
        )  # fmt: skip
    plan = plan_lerobot_peft(
        source,
        base,
        precision,
        model,
        naming or lerobot_export.Naming(),
        allow_nonstandard_dims=allow_nonstandard_dims,
        progress=progress,
    )
    with _output.staged_directory(out, overwrite=overwrite) as tmp:
        manifest = write_lerobot_peft(tmp, source, plan, model, out, progress=progress)
    logger.info("exported %s as a LeRobot PEFT adapter on %s to %s", step_dir, base.name_or_path, out)
    return pytorch_export.ExportResult(out, manifest)


def plan_lerobot_peft(
    source: pytorch_export.ExportSource,
    base: BaseRef,
    precision: lerobot_export.Precision | None,
    model: lerobot_export.LeRobotModel,
    naming: lerobot_export.Naming,
    *,
    allow_nonstandard_dims: bool = False,
    progress: pytorch_export.ProgressFn | None = None,
) -> PeftPlan:
    """The merged export's plan and the adapter's layout; with a local BASE, its config and every tensor checked."""
    if source.merge is None:
        raise CheckpointError(f"{source.what} is merged already: a PEFT adapter is made of a LoRA step's adapters")
    base_config = _read_base_config(base) if base.local is not None else None
    if precision is None:
        precision = base_config.get("dtype") if base_config is not None else "float32"
    plan = lerobot_export.plan_lerobot(
        source.structure,
        source.assets,
        precision,
        model,
        naming,
        allow_nonstandard_dims=allow_nonstandard_dims,
        what=source.what,
    )
    if plan.spec.kind not in peft_layout.POLICY_CLASS:
        raise ConfigError(f"LeRobot PEFT adapters are made for pi0 and pi0.5, not {plan.spec.kind}")
    tree = source.params.tree
    adapters = source.merge.adapters
    if base_config is None:
        save = peft_layout.trained_tensors(plan.layout, tree, adapters)
        why, check = (
            "trained by the fine-tune (not bfloat16 in the step: openpi's freeze filter did not select it)",
            None,
        )
    else:
        _check_base_config(base, base_config, plan.spec)
        save, check = _compare_with_base(source, plan.layout, base, progress)
        why = "differs from BASE (the fine-tune trained it)"
    try:
        adapter = peft_layout.build_peft_layout(plan.layout, adapters, tree, save)
    except peft_layout.PeftLayoutError as e:
        raise ConfigError(f"{source.what}: {e}") from e
    return PeftPlan(plan, adapter, base, check, why)


def _read_base_config(base: BaseRef) -> dict[str, Any]:
    assert base.local is not None
    try:
        config = json.loads((base.local / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--base {base.local}: cannot read its config.json ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"--base {base.local}: its config.json is not a LeRobot policy config")
    return config


def _check_base_config(base: BaseRef, config: dict[str, Any], spec: files.PolicySpec) -> None:
    """BASE must be the same policy: LeRobot builds it from the adapter's config.json and loads BASE's tensors."""
    ours = {
        "type": spec.kind,
        "paligemma_variant": spec.paligemma_variant,
        "action_expert_variant": spec.action_expert_variant,
        "dtype": spec.dtype,
        "max_state_dim": spec.max_dim,
        "max_action_dim": spec.max_dim,
    }
    differ = {k: (config.get(k), v) for k, v in ours.items() if config.get(k) != v}
    if config.get("use_peft"):
        differ["use_peft"] = (True, False)
    if differ:
        listed = ", ".join(f"{k} {theirs!r} (this step: {mine!r})" for k, (theirs, mine) in differ.items())
        raise ConfigError(f"--base {base.local} is not this step's base policy: its config.json has {listed}")


def _compare_with_base(
    source: pytorch_export.ExportSource,
    merged: lerobot_layout.LeRobotLayout,
    base: BaseRef,
    progress: pytorch_export.ProgressFn | None,
) -> tuple[set[str], dict[str, Any]]:
    """Every tensor of the step's own weights (its adapters' bases unmerged) against BASE's, bitwise: the names of
    trained ones that differ; refuses a frozen or adapted one that differs. BASE's bytes are read at its header's
    offsets (`os.preadv`, one tensor or row block at a time), not memory-mapped."""
    assert base.local is not None
    path = base.local / lerobot_export.MODEL_FILE
    expected = {s.name: s for s in merged.tensors if s.recipe.source is not None}
    adapted = {a.base_path for a in source.merge.adapters} if source.merge is not None else set()
    tree = source.params.tree
    differ, frozen_differ, done = set(), [], 0
    with _SafetensorsReader(path) as f:
        if missing := sorted(set(expected) - set(f.entries)):
            raise ConfigError(f"--base {path} lacks tensors of this step's policy: {missing[:5]} ({len(missing)})")
        for spec, rows, array in export_stream.laid_out_tensors(source.params, merged):
            if spec.name not in expected:
                continue
            if not f.equals(spec.name, array, rows):
                trained = spec.recipe.source not in adapted and str(tree[spec.recipe.source].dtype) != "bfloat16"
                (differ.add if trained else frozen_differ.append)(spec.name)
            if progress is not None and (rows is None or rows.stop == spec.shape[0]):
                done += 1
                progress("base check", done, len(merged.tensors))
    if frozen_differ:
        raise ConfigError(
            f"--base {base.local} is not this step's base: {len(frozen_differ)} frozen or adapted weights differ "
            f"from the step's ({', '.join(sorted(frozen_differ)[:3])}, ...); export the base checkpoint the "
            "fine-tune started from"
        )
    check = {
        "model_file": str(path),
        "tensors_compared": len(expected),
        "bitwise_equal": len(expected) - len(differ),
        "differ_trained": len(differ),
        "rule": "each tensor as the step's own weights would export (adapters not merged) against BASE's, bitwise; "
        "a frozen (bfloat16 in the step) or adapted weight that differs is refused",
    }
    return differ, check


class _SafetensorsReader:
    """A safetensors file's tensors compared with arrays, read with `os.preadv` into one reused buffer."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            header = json.loads(os.pread(self.fd, n, 8))
        except (OSError, ValueError, struct.error) as e:
            os.close(self.fd)
            raise ConfigError(f"--base {path}: not a safetensors file ({e})") from e
        header.pop("__metadata__", None)
        self.entries: dict[str, dict[str, Any]] = header
        self.data_start = 8 + n
        self.buffer = bytearray()

    def __enter__(self) -> _SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def equals(self, name: str, array: np.ndarray, rows: slice | None) -> bool:
        """Whether the tensor (its `rows` of axis 0) has `array`'s dtype, shape and bytes."""
        entry = self.entries[name]
        ours = np.ascontiguousarray(array)
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None:
            row = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows.start * row, begin + rows.stop * row
            shape[0] = rows.stop - rows.start
        if _SAFETENSORS_DTYPES.get(entry["dtype"]) != ours.dtype or shape != list(ours.shape):
            return False
        if len(self.buffer) < end - begin:
            self.buffer = bytearray(end - begin)
        view = memoryview(self.buffer)[: end - begin]
        safetensors_stream.read_into(self.fd, view, self.data_start + begin)
        return bool(np.array_equal(np.frombuffer(view, np.uint8), ours.reshape(-1).view(np.uint8)))


_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(layout.ml_dtypes.bfloat16)}


def write_lerobot_peft(
    directory: pathlib.Path,
    source: pytorch_export.ExportSource,
    plan: PeftPlan,
    model: lerobot_export.LeRobotModel,
    output_path: pathlib.Path,
    *,
    progress: pytorch_export.ProgressFn | None = None,
) -> dict[str, Any]:
    """adapter_model.safetensors, adapter_config.json, config.json, the processors and, last, manifest.json."""
    start = time.perf_counter()
    adapter = plan.adapter
    readback, known, factor_check = _write_adapter_file(directory / ADAPTER_MODEL, source, adapter, progress)
    config = adapter.lora_config(plan.base.name_or_path, plan.base.revision)
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written = [ADAPTER_MODEL, ADAPTER_CONFIG, *_write_policy_files(directory, plan.lerobot)]
    merged_bytes = safetensors_stream.file_size(plan.lerobot.layout.tensors)
    adapter_bytes = known[ADAPTER_MODEL]["bytes"]
    norm_stats = plan.lerobot.norm_stats_path
    checkpoint = source.assets.parent if source.assets is not None else None
    manifest = {
        **_output.manifest_head(FORMAT_VERSION),
        "format": "lerobot-peft",
        "lerobot_version": "0.6.1",
        "peft_version": peft_layout.PEFT_VERSION,
        "source": {
            **source.info,
            "norm_stats": str(
                norm_stats.relative_to(checkpoint)
                if checkpoint is not None and norm_stats.is_relative_to(checkpoint)
                else norm_stats
            ),
            "norm_stats_sha256": _output.sha256_of(norm_stats),
        },
        "output": str(output_path),
        "base": {**plan.base.to_json(), "check": plan.base_check},
        "serving_config": source.record.get("serving_config"),
        "lora_config": source.record.get("lora_config"),
        "policy": {"type": plan.lerobot.spec.kind, **dataclasses.asdict(model)},
        "precision": plan.lerobot.layout.precision,
        "adapter": {
            "lora_targets": len(adapter.targets),
            "ranks": sorted({t.rank for t in adapter.targets}),
            "modules_to_save": list(adapter.modules_to_save),
            "saved_tensors": len(adapter.saved),
            "why_saved": plan.why_saved,
        },
        "size": {
            "adapter_model_bytes": adapter_bytes,
            "merged_export_model_bytes": merged_bytes,
            "adapter_fraction": round(adapter_bytes / merged_bytes, 6),
        },
        "nonstandard_dims": {
            k: {"model": m, "lerobot": t} for k, (m, t) in plan.lerobot.layout.nonstandard_dims.items()
        },
        "files_written": written,
        "verification": {"factors": factor_check, "file": readback},
        "seconds": round(time.perf_counter() - start, 3),
    }
    return _output.write_manifest(directory, manifest, known=known)


def _write_policy_files(directory: pathlib.Path, plan: lerobot_export.Plan) -> list[str]:
    """LeRobot's config.json with `use_peft` (what its training writes beside a PEFT adapter, and what `make_policy`
    builds the base policy with) and the processor files, as the LeRobot export writes them."""
    config = json.loads(files.config_json(plan.spec))
    config["use_peft"] = True
    (directory / "config.json").write_text(json.dumps(config, indent=4))
    written = ["config.json"]
    for name, text in files.processor_files(plan.spec).items():
        (directory / name).write_text(text)
        written.append(name)
    for name in files.state_file_names(plan.spec):
        files.write_stats(directory / name, plan.stats)
        written.append(name)
    return written


def _write_adapter_file(
    path: pathlib.Path,
    source: pytorch_export.ExportSource,
    adapter: peft_layout.PeftLayout,
    progress: pytorch_export.ProgressFn | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The factors (each adapter read once; every target checked against openpi's delta laid out as its Linear),
    then the tensors to save (laid out as the merged export lays them out), hashed and read back."""
    entries = adapter.tensors
    total, done = len(entries), 0
    worst = 0.0
    writer = safetensors_stream.PositionalWriter(path, entries, peft_layout.SAFETENSORS_METADATA)
    with writer:
        by_adapter: dict[str, list[peft_layout.LoRATarget]] = {}
        for t in adapter.targets:
            by_adapter.setdefault(t.adapter.a_path, []).append(t)
        for targets in by_adapter.values():
            a_path, b_path = targets[0].adapter.a_path, targets[0].adapter.b_path
            arrays = source.params.read([a_path, b_path])
            for t in targets:
                layer = t.weight.recipe.layer
                a = arrays[a_path] if layer is None else arrays[a_path][layer]
                b = arrays[b_path] if layer is None else arrays[b_path][layer]
                lora_a, lora_b = t.factoring.factors(a, b)
                worst = max(worst, _factor_error(t, a, b, lora_a, lora_b, seed=done))
                writer.write(t.lora_a_name, lora_a)
                writer.write(t.lora_b_name, lora_b)
                done += 2
                if progress is not None:
                    progress("adapter", done, total)
        saved = _Saved(adapter.saved)
        for spec, rows, array in export_stream.laid_out_tensors(source.params, saved):
            writer.write(peft_layout.PEFT_PREFIX + spec.name, array, rows)
            if rows is None or rows.stop == spec.shape[0]:
                done += 1
                if progress is not None:
                    progress("adapter", done, total)
    if worst > FACTOR_TOLERANCE:
        raise CheckpointError(f"PEFT factors off openpi's delta by {worst:.2e} (> {FACTOR_TOLERANCE:g}): not written")
    readback = safetensors_stream.read_back(path, writer.digests, writer.header)
    record = {
        "reader": "safetensors.safe_open (header) and os.preadv (bytes at the header's offsets)",
        "tensors_checked": readback.tensors_checked,
        "bitwise": True,
    }
    factor_check = {
        "targets": len(adapter.targets),
        "max_rel_err": worst,
        "tolerance": FACTOR_TOLERANCE,
        "probes": PROBES,
        "check": "per target and layer, random probes through PEFT's LoRA term (scaling * (x @ lora_A.T) @ lora_B.T) "
        "and through openpi's two LoRA einsums times its scale (the probe laid out as the layer's input, the output "
        "as the Linear's), float64; max |difference| / max |openpi's term|",
    }
    return record, {path.name: {"sha256": readback.file_sha256, "bytes": readback.bytes}}, factor_check


def _factor_error(t: peft_layout.LoRATarget, a, b, lora_a: np.ndarray, lora_b: np.ndarray, seed: int) -> float:
    """Random probes through PEFT's LoRA term (`scaling * (x @ lora_A.T) @ lora_B.T`) and through openpi's own two
    LoRA einsums (`lora.Einsum` / `FeedForward._dot`, times openpi's scale), the probe laid out as the layer's input
    and the output as the Linear's; max |difference| / max |openpi's term|, in float64."""
    f = t.factoring
    layer_eqn, eqn_a, eqn_b = eq.to_letters(t.adapter.delta.layer_equation, *t.adapter.delta.lora_equations)
    x_labels, w_labels, out_labels = eq.split_equation(layer_eqn)
    to_layer = dict(zip(eq.split_equation(t.adapter.delta.equation)[2], w_labels, strict=True))
    ins, outs = ([to_layer[c] for c in labels] for labels in (f.axes.in_labels, f.axes.out_labels))
    sizes = {to_layer[c]: n for c, n in f.sizes.items() if c in to_layer}
    batch = [c for c in x_labels if c not in w_labels]  # the layer's batch and token axes: PROBES probes on the first
    sizes |= {c: (PROBES if i == 0 else 1) for i, c in enumerate(batch)}
    x = np.random.default_rng(seed).standard_normal((PROBES, f.in_features))
    x_layer = _relabel(x.reshape([sizes[c] for c in (batch[0], *ins)]), [batch[0], *ins], x_labels, sizes)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = np.einsum(eqn_b, np.einsum(eqn_a, x_layer, a), b) * t.adapter.scale
    if t.weight.recipe.split is not None:  # the half of the layer's output this Linear computes
        axis = out_labels.index(w_labels[0])
        want, out_labels = np.take(want, t.weight.recipe.split, axis=axis), out_labels.replace(w_labels[0], "")
    want = _relabel(want, list(out_labels), [batch[0], *outs], sizes).reshape(PROBES, f.out_features)
    peft = peft_adapter.LinearLoRA(lora_a, lora_b, t.alpha)
    got = (x @ peft.lora_a.astype(np.float64).T) @ peft.lora_b.astype(np.float64).T * peft.scaling
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) or 1.0))


def _relabel(x: np.ndarray, labels: list[str], want: list[str] | str, sizes: dict[str, int]) -> np.ndarray:
    """`x` (axes `labels`) with axes `want`: transposed, size-1 axes added or dropped."""
    keep = [c for c in labels if c in want]
    x = x.reshape([sizes[c] for c in keep]) if len(keep) < len(labels) else x
    x = x.transpose([keep.index(c) for c in want if c in keep])
    return x.reshape([sizes[c] for c in want])


@dataclasses.dataclass(frozen=True)
class _Saved:
    """The tensors to save, as a plan `export_stream.laid_out_tensors` lays out."""

    tensors: tuple[layout.TensorSpec, ...]
