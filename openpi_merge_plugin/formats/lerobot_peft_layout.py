"""What a PEFT LoRA adapter of LeRobot 0.6.1's `PI0Policy` / `PI05Policy` holds for an openpi LoRA step: the names,
shapes, dtypes and recipes of `adapter_model.safetensors` and the `LoraConfig` of `adapter_config.json` (PEFT
0.21.2, as read from its code and from what it wrote for LeRobot's policy: tests/data/lerobot-0.6.1-peft/).

Built on the LeRobot export's layout of the merged step (`lerobot_layout`, the one layout table): every Linear whose
weight an openpi adapter changes becomes a LoRA target (`peft_adapter.factoring` on that entry's layer, split and
ops), its two factors tensors whose recipes read one layer slice of `lora_a` or `lora_b` (`Factoring.ops`); the
tensors the fine-tune trained outside the adapters go in `modules_to_save`, as the fewest whole modules that hold
exactly them, with the merged export's recipes (they are not adapted: the step's leaves as they are). Shapes only;
the arrays are the export's one pass.

PEFT's names (`get_peft_model_state_dict`, adapter name removed): `base_model.model.<module>.lora_A.weight` and
`.lora_B.weight` for a target, `base_model.model.<state-dict name>` for a tensor of a module to save. Module names
are the policy's (`model.` + PI0Pytorch's), which PEFT matches exactly: `target_modules` as a list (exact name),
`rank_pattern` / `alpha_pattern` keys as regular expressions (`re.escape` of the exact name), `modules_to_save` by
suffix (`key.endswith(name)`; a whole name matches only itself).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
import dataclasses
import re
from typing import Any

from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.lora import peft_adapter
from openpi_merge_plugin.lora.adapters import Adapter

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the policy
WEIGHT = ".weight"
PEFT_VERSION = "0.21.2"  # what the files were checked against
POLICY_CLASS = {"pi0": ("PI0Policy", "lerobot.policies.pi0.modeling_pi0")}
POLICY_CLASS["pi05"] = ("PI05Policy", "lerobot.policies.pi05.modeling_pi05")
SAFETENSORS_METADATA = {"format": "pt"}  # what PeftModel.save_pretrained writes


class PeftLayoutError(ValueError):
    """A step, or a choice of what to save, that no PEFT LoRA adapter of LeRobot's policy can express."""


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One Linear of the policy with a LoRA adapter: where its factors come from and what PEFT calls them."""

    module: str  # the Linear's module name in the policy
    weight: layout.TensorSpec  # its weight in the merged LeRobot export (source leaf, layer, split, ops)
    adapter: Adapter
    factoring: peft_adapter.Factoring

    @property
    def rank(self) -> int:
        return self.factoring.rank

    @property
    def alpha(self) -> float:
        return peft_adapter.peft_alpha(self.adapter.scale, self.rank)

    @property
    def lora_a_name(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight"

    @property
    def lora_b_name(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B.weight"

    def factor_specs(self, step_tree: Mapping[str, Any]) -> tuple[layout.TensorSpec, layout.TensorSpec]:
        """lora_A and lora_B as tensors of the file: float32, each made of one layer slice of openpi's lora_a or
        lora_b by the factoring's ops."""
        specs = []
        for factor, name, path in (
            ("A", self.lora_a_name, self.adapter.a_path),
            ("B", self.lora_b_name, self.adapter.b_path),
        ):
            shape = self.factoring.shape(factor)
            recipe = layout.Recipe(
                source=path,
                source_shape=_shape(step_tree[path]),
                layer=self.weight.recipe.layer,
                split=None,  # the factoring's ops take it (the split axis may sit anywhere in lora_a / lora_b)
                ops=self.factoring.ops(factor),
                round_bf16=False,
                dtype="float32",
                shape=shape,
            )
            specs.append(layout.TensorSpec(name, shape, "F32", "float32", recipe))
        return specs[0], specs[1]


@dataclasses.dataclass(frozen=True)
class PeftLayout:
    merged: lerobot_layout.LeRobotLayout  # the merged export of the same step: BASE + this adapter
    targets: tuple[LoRATarget, ...]
    saved: tuple[layout.TensorSpec, ...]  # the tensors of `modules_to_save` (LeRobot's names)
    modules_to_save: tuple[str, ...]
    factors: tuple[layout.TensorSpec, ...]  # lora_A, lora_B of each target, in target order

    @property
    def tensors(self) -> tuple[layout.TensorSpec, ...]:
        """The entries of adapter_model.safetensors: the factors, then the modules to save under PEFT's names."""
        return (*self.factors, *(dataclasses.replace(s, name=PEFT_PREFIX + s.name) for s in self.saved))

    def lora_config(self, base_model_name_or_path: str, revision: str | None = None) -> dict[str, Any]:
        """adapter_config.json: PEFT's `LoraConfig` with every field that changes what the adapter computes set
        explicitly (the rest are PEFT's defaults, which add nothing: no dropout at inference, no bias, no DoRA).

        Every target's rank and alpha are in `rank_pattern` / `alpha_pattern`, so `r` / `lora_alpha` (the first
        target's) decide nothing; `alpha / rank` is openpi's scale exactly. `use_rslora` is off: PEFT's rsLoRA divides
        by the square root of PEFT's rank, which is not openpi's (`alpha_pattern` carries openpi's rsLoRA scale)."""
        if not self.targets:
            raise PeftLayoutError("the step has no LoRA adapters: nothing for a LoRA adapter to hold")
        first = self.targets[0]
        class_name, module = POLICY_CLASS[self.merged.kind]
        return {
            "auto_mapping": {"base_model_class": class_name, "parent_library": module},
            "base_model_name_or_path": base_model_name_or_path,
            "bias": "none",
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "lora_alpha": first.alpha,
            "lora_bias": False,
            "lora_dropout": 0.0,
            "modules_to_save": list(self.modules_to_save) or None,
            "peft_type": "LORA",
            "peft_version": PEFT_VERSION,
            "r": first.rank,
            "rank_pattern": {re.escape(t.module): t.rank for t in self.targets},
            "alpha_pattern": {re.escape(t.module): t.alpha for t in self.targets},
            "revision": revision,
            "target_modules": [t.module for t in self.targets],
            "target_parameters": None,
            "task_type": None,
            "use_dora": False,
            "use_rslora": False,
        }


def trained_tensors(
    merged: lerobot_layout.LeRobotLayout, step_tree: Mapping[str, Any], adapters: Sequence[Adapter]
) -> set[str]:
    """LeRobot tensors the fine-tune trained outside its adapters, read off the step's structure: openpi's
    `train.py` casts every param its freeze filter selects to bfloat16 (`init_train_state`), so a non-LoRA leaf that
    is not bfloat16 was trained. An adapted weight is never one (it is the adapter's base)."""
    bases = {a.base_path for a in adapters}
    return {
        s.name
        for s in merged.tensors
        if s.recipe.source is not None
        and s.recipe.source not in bases
        and _dtype(step_tree[s.recipe.source]) != "bfloat16"
    }


def _dtype(leaf: Any) -> str:
    return str(leaf[1] if isinstance(leaf, tuple) else leaf.dtype)


def build_peft_layout(
    merged: lerobot_layout.LeRobotLayout,
    adapters: Sequence[Adapter],
    step_tree: Mapping[str, Any],
    save: Collection[str],
) -> PeftLayout:
    """The adapter of a LoRA step whose merged LeRobot export is `merged`: its adapters (`engine.plan` of the step,
    `step_tree` its path -> (shape, dtype) or ShapeDtype) as LoRA targets, and the LeRobot tensors named in `save`
    (`trained_tensors`, or those that differ from a local BASE) in `modules_to_save`."""
    if merged.kind not in POLICY_CLASS:
        raise PeftLayoutError(f"LeRobot's {merged.kind} policy is not supported for PEFT adapters (pi0 and pi0.5 are)")
    names = {s.name for s in merged.tensors}
    if unknown := sorted(set(save) - names):
        raise PeftLayoutError(f"tensors to save that LeRobot's policy does not have: {unknown}")
    save = whole_modules(names, save)
    by_base = {a.base_path: a for a in adapters}
    targets, placed = [], set()
    for spec in merged.tensors:
        adapter = by_base.get(spec.recipe.source)
        if adapter is None:
            continue
        if spec.name in save:
            raise PeftLayoutError(
                f"{spec.name} carries the adapter {adapter.a_path} but was also trained itself (or is in a module "
                "with a trained tensor): a PEFT LoRA target cannot also be a module to save"
            )
        targets.append(_target(spec, adapter, step_tree))
        placed.add(adapter.base_path)
    if missing := sorted(set(by_base) - placed):
        raise PeftLayoutError(f"adapters of {missing} have no Linear in LeRobot's policy")
    modules = modules_covering(names, save)
    saved = tuple(s for s in merged.tensors if s.name in save)
    targets.sort(key=lambda t: t.module)
    factors = tuple(spec for t in targets for spec in t.factor_specs(step_tree))
    return PeftLayout(merged, tuple(targets), saved, modules, factors)


def _target(spec: layout.TensorSpec, adapter: Adapter, step_tree: Mapping[str, Any]) -> LoRATarget:
    if not spec.name.endswith(WEIGHT) or len(spec.shape) != 2:
        raise PeftLayoutError(f"{spec.name} (adapter {adapter.a_path}) is not the weight of an nn.Linear")
    recipe = spec.recipe
    n_lead = len(adapter.lead_shape)
    if n_lead != (recipe.layer is not None):
        raise PeftLayoutError(f"{adapter.a_path}: {n_lead} scanned axes, but {spec.name} is one layer's weight")
    a_shape, b_shape = (tuple(_shape(step_tree[p]))[n_lead:] for p in (adapter.a_path, adapter.b_path))
    try:
        factoring = peft_adapter.factoring(adapter.delta, a_shape, b_shape, split=recipe.split, ops=recipe.ops)
    except peft_adapter.PeftLayoutError as e:
        raise PeftLayoutError(f"{spec.name} (adapter {adapter.a_path}): {e}") from e
    if (factoring.out_features, factoring.in_features) != spec.shape:
        raise PeftLayoutError(
            f"{spec.name}: the adapter {adapter.a_path} factors to [{factoring.out_features}, "
            f"{factoring.in_features}], the weight is {list(spec.shape)}"
        )
    return LoRATarget(spec.name[: -len(WEIGHT)], spec, adapter, factoring)


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf[0] if isinstance(leaf, tuple) else leaf.shape)


def whole_modules(names: Collection[str], save: Collection[str]) -> set[str]:
    """`save` and every other tensor of the modules its tensors belong to (PEFT saves and loads a module whole; the
    others are unchanged, so saving them too changes nothing)."""
    modules = {name.rsplit(".", 1)[0] for name in save}
    return set(save) | {name for name in names if name.rsplit(".", 1)[0] in modules}


def modules_covering(names: Collection[str], save: Collection[str]) -> tuple[str, ...]:
    """The fewest modules whose state dicts hold exactly the tensors `save` (whole modules: `whole_modules`) of a
    model whose state dict is `names`: for each tensor its outermost module all of whose tensors are saved."""
    save = set(save)
    below: dict[str, set[str]] = {}  # module -> every tensor name under it
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            below.setdefault(".".join(parts[:i]), set()).add(name)
    modules = set()
    for name in save:
        parts = name.split(".")
        for i in range(1, len(parts)):  # outermost first
            module = ".".join(parts[:i])
            if below[module] <= save:
                modules.add(module)
                break
        else:
            raise PeftLayoutError(f"{name}: its module also holds tensors that are not saved")
    return tuple(sorted(modules))
