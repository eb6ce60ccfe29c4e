"""A LoRA step as a PEFT LoRA adapter that LeRobot 0.6.1 loads on a base policy (`--policy.use_peft=true
--policy.path=DIR`): `export STEP --format lerobot-peft --base BASE`.

The directory LeRobot's `make_policy` reads (and its own PEFT training writes): `adapter_model.safetensors` (the LoRA
factors and the modules to save, `lerobot_peft_layout`), `adapter_config.json` (PEFT's `LoraConfig`,
`base_model_name_or_path` = BASE), LeRobot's `config.json` with `use_peft: true` and the processors with the step's
norm stats (`lerobot_files`, as `--format lerobot` writes them). Needs no LeRobot, PEFT, torch or openpi.

BASE is a LeRobot policy directory of the step's base weights or a hub id. A local BASE is read whole and compared,
tensor by tensor and bitwise, with what the step's own weights export to (its adapters not merged), before the pass:
a frozen or adapted weight that differs is refused (the fine-tune did not start from that BASE), a trained one that
differs goes in `modules_to_save`, one that does not stays with BASE. For a hub id, the trained tensors are read off
the step's structure (`lerobot_peft_layout.trained_tensors`). Once written, every target and layer of the file is
checked against openpi's own two LoRA einsums (`check`).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
import logging
import os
import pathlib
import re
import struct
from typing import Any

import numpy as np
from safetensors.numpy import safe_open

from openpi_merge_plugin.checkpoint import safetensors_stream
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.formats import base
from openpi_merge_plugin.formats import lerobot
from openpi_merge_plugin.formats import lerobot_files as files
from openpi_merge_plugin.formats import lerobot_peft_layout as peft_layout
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora import peft_adapter
from openpi_merge_plugin.lora.adapters import is_lora_path

logger = logging.getLogger("openpi_merge_plugin")

NAME = "lerobot-peft"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_MODEL = "adapter_model.safetensors"
BASE_MODEL = "model.safetensors"  # a LeRobot policy directory's weights
# What the written factors must reproduce: PEFT's LoRA term against openpi's (its two LoRA einsums), on random
# probes, relative to openpi's largest output (float32 factors; measured ~1e-7).
FACTOR_TOLERANCE = 1e-5
PROBES = 4  # random inputs per target and layer for that check
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_BASE_WHAT = "the base policy (--base)"


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
            missing = [n for n in ("config.json", BASE_MODEL) if not (path / n).is_file()]
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


def reads(options: base.ExportOptions) -> list[tuple[pathlib.Path, str]]:
    """A local --base: never the output, around it or inside it."""
    if options.base is None:
        return []
    path = pathlib.Path(options.base).expanduser()
    return [(path, _BASE_WHAT)] if path.exists() else []


def plan(given: base.PlanInput) -> base.FormatPlan:
    """The adapter of a LoRA step (`given.structure`: its leaves as they are, `given.adapters` paired): the merged
    export's layout and files, the factors and modules to save; with a local BASE, its config and every tensor
    checked first."""
    options = given.options
    if not given.adapters:
        raise ConfigError(f"{given.what} has no LoRA adapters: --format {NAME} writes a LoRA step's adapters")
    if options.base is None:
        raise ConfigError(
            f"--format {NAME} needs --base BASE: the LeRobot policy directory of the step's base weights (`export "
            "BASE_CHECKPOINT --format lerobot`), or a hub id"
        )
    ref = BaseRef.parse(options.base, options.base_revision)
    base_config = _read_base_config(ref) if ref.local is not None else None
    precision = options.precision_or(base_config.get("dtype", "float32") if base_config is not None else "float32")
    step_tree = base.shape_table(given.structure)
    weights = {p: sd for p, sd in given.structure.items() if not is_lora_path(p)}  # the merged export's structure
    merged = lerobot.plan_lerobot(
        weights, given.facts, dataclasses.replace(options, precision=precision), what=given.what
    )
    if merged.spec.kind not in peft_layout.POLICY_CLASS:
        raise ConfigError(f"LeRobot PEFT adapters are made for pi0 and pi0.5, not {merged.spec.kind}")
    if base_config is None:
        save = peft_layout.trained_tensors(merged.layout, step_tree, given.adapters)
        why, check = (
            "trained by the fine-tune (not bfloat16 in the step: openpi's freeze filter did not select it)",
            None,
        )
    else:
        _check_base_config(ref, base_config, merged.spec)
        save, check = _compare_with_base(given, merged.layout, ref)
        why = "differs from BASE (the fine-tune trained it)"
    try:
        adapter = peft_layout.build_peft_layout(merged.layout, given.adapters, step_tree, save)
    except peft_layout.PeftLayoutError as e:
        raise ConfigError(f"{given.what}: {e}") from e
    config = adapter.lora_config(ref.name_or_path, ref.revision)
    spec = dataclasses.replace(merged.spec, use_peft=True)
    adapter_bytes = safetensors_stream.file_size(adapter.tensors, peft_layout.SAFETENSORS_METADATA)
    merged_bytes = safetensors_stream.file_size(merged.layout.tensors)
    return base.FormatPlan(
        tensors=adapter.tensors,
        metadata=peft_layout.SAFETENSORS_METADATA,
        files={
            ADAPTER_CONFIG: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            **files.all_files(spec, merged.stats),
        },
        model_file=ADAPTER_MODEL,
        precision=precision,
        check=lambda directory, source: check_factors(adapter, directory, source),
        manifest={
            "lerobot_version": lerobot.LEROBOT_VERSION,
            "peft_version": peft_layout.PEFT_VERSION,
            "source": {"norm_stats": given.facts.norm_stats},
            "base": {**ref.to_json(), "check": check},
            "policy": {
                "type": spec.kind,
                "action_horizon": given.facts.action_horizon,
                "max_token_len": spec.tokenizer_max_length,
                "action_dim": spec.max_dim,
                "n_action_steps": spec.n_action_steps,
                "cameras": list(spec.cameras),
                "config_name": given.facts.config_name,
            },
            "adapter": {
                "lora_targets": len(adapter.targets),
                "ranks": sorted({t.rank for t in adapter.targets}),
                "modules_to_save": list(adapter.modules_to_save),
                "saved_tensors": len(adapter.saved),
                "why_saved": why,
            },
            "size": {
                "adapter_model_bytes": adapter_bytes,
                "merged_export_model_bytes": merged_bytes,
                "adapter_fraction": round(adapter_bytes / merged_bytes, 6),
            },
            "nonstandard_dims": {k: {"model": m, "lerobot": t} for k, (m, t) in merged.layout.nonstandard_dims.items()},
        },
    )


def _read_base_config(ref: BaseRef) -> dict[str, Any]:
    assert ref.local is not None
    try:
        config = json.loads((ref.local / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--base {ref.local}: cannot read its config.json ({e})") from e
    if not isinstance(config, dict):
        raise ConfigError(f"--base {ref.local}: its config.json is not a LeRobot policy config")
    return config


def _check_base_config(ref: BaseRef, config: dict[str, Any], spec: files.PolicySpec) -> None:
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
        raise ConfigError(f"--base {ref.local} is not this step's base policy: its config.json has {listed}")


def _compare_with_base(given: base.PlanInput, merged: Any, ref: BaseRef) -> tuple[set[str], dict[str, Any]]:
    """Every tensor of the step's own weights (its adapters' bases unmerged), laid out by the pass's own reader,
    against BASE's, bitwise: the names of trained ones that differ; refuses a frozen or adapted one that differs.
    BASE's bytes are read at its header's offsets (`os.preadv`, one tensor or row block at a time), not
    memory-mapped."""
    assert ref.local is not None
    if given.values is None:
        raise ConfigError(f"--base {ref.local}: this export cannot read the step's values to compare them with BASE")
    path = ref.local / BASE_MODEL
    expected = tuple(s for s in merged.tensors if s.recipe.source is not None)
    adapted = {a.base_path for a in given.adapters}
    differ, frozen_differ, rounded = set(), [], 0
    logger.info("comparing the %d tensors of --base %s with the step's own weights", len(expected), ref.local)
    with _SafetensorsReader(path) as f:
        if missing := sorted({s.name for s in expected} - set(f.entries)):
            raise ConfigError(f"--base {path} lacks tensors of this step's policy: {missing[:5]} ({len(missing)})")
        for spec, rows, array in given.values(base.FormatPlan(tensors=expected)):
            if f.equals(spec.name, array, rows):
                continue
            source = spec.recipe.source
            if source not in adapted and str(given.structure[source].dtype) != "bfloat16":
                differ.add(spec.name)
                continue
            frozen_differ.append(spec.name)
            rounded += f.rounds_to(spec.name, array, rows)
    if frozen_differ:
        names = sorted(set(frozen_differ))
        hint = (
            " (BASE holds values the step's bfloat16 frozen weights are the rounding of: openpi's train.py casts "
            "what its freeze filter selects to bfloat16, so BASE must be made of the step's own weights: "
            "`openpi-merge-lora STEP --strength 0 --output DIR` then `openpi-merge-lora export DIR --format lerobot`)"
            if rounded == len(frozen_differ)
            else "; export the base checkpoint the fine-tune started from"
        )
        raise ConfigError(
            f"--base {ref.local} is not this step's base: {len(names)} frozen or adapted weights differ from the "
            f"step's ({', '.join(names[:3])}, ...){hint}"
        )
    check = {
        "model_file": str(path),
        "tensors_compared": len(expected),
        "bitwise_equal": len(expected) - len(differ),
        "differ_trained": len(differ),
        "rule": "each tensor as the step's own weights export (adapters not merged) against BASE's, bitwise; a "
        "frozen (bfloat16 in the step) or adapted weight that differs is refused",
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

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def _read(self, name: str, rows: slice | None) -> np.ndarray | None:
        """The tensor (its `rows` of axis 0) as stored, or None where its dtype is not one the export writes."""
        entry = self.entries[name]
        dtype = safetensors_stream.DTYPES.get(entry["dtype"])
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None:
            row = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows.start * row, begin + rows.stop * row
            shape[0] = rows.stop - rows.start
        if dtype is None:
            return None
        if len(self.buffer) < end - begin:
            self.buffer = bytearray(end - begin)
        view = memoryview(self.buffer)[: end - begin]
        safetensors_stream.read_into(self.fd, view, self.data_start + begin)
        return np.frombuffer(view, dtype).reshape(shape)

    def equals(self, name: str, array: np.ndarray, rows: slice | None) -> bool:
        """Whether the tensor (its `rows` of axis 0) has `array`'s dtype, shape and bytes."""
        theirs = self._read(name, rows)
        ours = np.ascontiguousarray(array)
        if theirs is None or theirs.dtype != ours.dtype or theirs.shape != ours.shape:
            return False
        return bool(np.array_equal(theirs.reshape(-1).view(np.uint8), ours.reshape(-1).view(np.uint8)))

    def rounds_to(self, name: str, array: np.ndarray, rows: slice | None) -> bool:
        """Whether BASE's tensor, rounded to bfloat16, is `array` (which holds bfloat16 values)."""
        theirs = self._read(name, rows)
        if theirs is None or theirs.shape != np.shape(array):
            return False
        rounded = theirs.astype(safetensors_stream.DTYPES["BF16"]).astype(np.float32)
        return bool(np.array_equal(rounded, np.asarray(array, np.float32)))


def check_factors(adapter: peft_layout.PeftLayout, directory: pathlib.Path, source: sources.ParamSource) -> dict:
    """Every target and layer of the adapter as written (the factors read back from the file, rank and alpha from
    adapter_config.json as PEFT reads them) against openpi's own two LoRA einsums on the step's adapters, on random
    probes; raises above FACTOR_TOLERANCE."""
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    worst, n = 0.0, 0
    by_adapter: dict[str, list[peft_layout.LoRATarget]] = {}
    for t in adapter.targets:
        by_adapter.setdefault(t.adapter.a_path, []).append(t)
    with safe_open(directory / ADAPTER_MODEL, "np") as f:
        for targets in by_adapter.values():
            a_path, b_path = targets[0].adapter.a_path, targets[0].adapter.b_path
            arrays = source.read([a_path, b_path])
            for t in targets:
                layer = t.weight.recipe.layer
                a, b = (np.asarray(arrays[p] if layer is None else arrays[p][layer]) for p in (a_path, b_path))
                key = re.escape(t.module)
                rank, alpha = config["rank_pattern"][key], config["alpha_pattern"][key]
                lora = peft_adapter.LinearLoRA(f.get_tensor(t.lora_a_name), f.get_tensor(t.lora_b_name), alpha)
                if lora.rank != rank:
                    raise CheckpointError(f"{t.module}: lora_A has rank {lora.rank}, adapter_config.json says {rank}")
                worst = max(worst, _factor_error(t, a, b, lora, seed=n))
                n += 1
    if worst > FACTOR_TOLERANCE:
        raise CheckpointError(f"PEFT factors off openpi's delta by {worst:.2e} (> {FACTOR_TOLERANCE:g}): not written")
    return {
        "factors": {
            "targets": len(adapter.targets),
            "max_rel_err": worst,
            "tolerance": FACTOR_TOLERANCE,
            "probes": PROBES,
            "check": "the factors as read back from adapter_model.safetensors, scaling = alpha / r as "
            "adapter_config.json gives them: per target and layer, random probes through PEFT's LoRA term (scaling "
            "* (x @ lora_A.T) @ lora_B.T) and through openpi's two LoRA einsums times its scale on the step's "
            "lora_a / lora_b (the probe laid out as the layer's input, the output as the Linear's), float64; "
            "max |difference| / max |openpi's term|",
        }
    }


def _factor_error(t: peft_layout.LoRATarget, a: Any, b: Any, lora: peft_adapter.LinearLoRA, seed: int) -> float:
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
    got = (x @ lora.lora_a.astype(np.float64).T) @ lora.lora_b.astype(np.float64).T * lora.scaling
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) or 1.0))


def _relabel(x: np.ndarray, labels: list[str], want: list[str] | str, sizes: dict[str, int]) -> np.ndarray:
    """`x` (axes `labels`) with axes `want`: transposed, size-1 axes added or dropped."""
    keep = [c for c in labels if c in want]
    x = x.reshape([sizes[c] for c in keep]) if len(keep) < len(labels) else x
    x = x.transpose([keep.index(c) for c in want if c in keep])
    return x.reshape([sizes[c] for c in want])


def describe(manifest: Mapping[str, Any]) -> list[str]:
    size, adapter, base_ = manifest["size"], manifest["adapter"], manifest["base"]
    mb = {k: f"{v / 1e6:.1f} MB" for k, v in size.items() if k.endswith("_bytes")}
    saved = ", ".join(adapter["modules_to_save"]) or "none"
    sizes = (
        f"adapter_model.safetensors {mb['adapter_model_bytes']} = {100 * size['adapter_fraction']:.1f}% of the "
        f"merged export ({mb['merged_export_model_bytes']}): {adapter['lora_targets']} LoRA targets; modules to "
        f"save: {saved}"
    )
    lines = [sizes]
    check = base_["check"]
    if check is not None:
        lines.append(
            f"--base checked: {check['bitwise_equal']}/{check['tensors_compared']} tensors bitwise equal, "
            f"{check['differ_trained']} trained ones differ (saved)"
        )
    if manifest["nonstandard_dims"]:
        lines.append(
            f"dimensions LeRobot does not build (--allow-nonstandard-dims): {', '.join(manifest['nonstandard_dims'])}"
        )
    load = f"--policy.use_peft=true --policy.path={manifest['output']} (base {base_['base_model_name_or_path']})"
    return [*lines, f"load with LeRobot: {load}"]


FORMAT = base.Format(
    NAME,
    plan,
    merged=False,
    options=lerobot.FORMAT.options | {"base", "base_revision"},
    describe=describe,
    reads=reads,
)
