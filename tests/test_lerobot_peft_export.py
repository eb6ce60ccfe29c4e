"""The LeRobot PEFT adapter of the bundled example (issue 32), written without LeRobot, torch or openpi.

What LeRobot and PEFT do with it is tests/test_lerobot_peft_gated.py (and *_runs_gated.py); here: the files against
what PEFT 0.21.2 and LeRobot 0.6.1 themselves wrote (tests/data/lerobot-0.6.1-peft/, see its PROVENANCE.md), what
goes in `modules_to_save` and why (openpi's freeze filter, recorded in the example's params listing), the checks of a
local BASE, and the refusals.
"""

import json
import pathlib
import re
import shutil
import struct

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import REPO
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from openpi_merge_plugin.checkpoint import lerobot_peft_layout as peft_layout
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import pytorch_layout
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.options import MergeOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import lerobot_export
from openpi_merge_plugin.pipeline import lerobot_peft_export as peft_export

PEFT_FIXTURES = REPO / "tests" / "data" / "lerobot-0.6.1-peft"
MODEL = json.loads((FIXTURE / "model_config.json").read_text())
LISTING = json.loads((FIXTURE / "params_listing.json").read_text())
LORA = checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
EXPORT = {
    "precision": "float32",
    "model": lerobot_export.LeRobotModel(MODEL["pi0_config"]["action_horizon"]),
    "naming": lerobot_export.Naming(device="cpu"),
    "allow_nonstandard_dims": True,
}
HUB = peft_export.BaseRef.parse("lerobot/pi0_base")


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """The example's merged LeRobot export, BASE (strength-0 merge, exported) and the adapter on a hub BASE."""
    tmp = tmp_path_factory.mktemp("peft-export")
    step = tmp / "checkpoint" / "2"
    shutil.copytree(FIXTURE / "checkpoint" / "2", step)
    before = {p.relative_to(step): p.read_bytes() for p in step.rglob("*") if p.is_file()}
    merged = lerobot_export.export_lerobot(step, output=tmp / "merged_lerobot", lora=LORA, **EXPORT).output
    base_merged = checkpoint_merge.merge_checkpoint(
        step, output=tmp / "base_merged", lora=LORA, options=MergeOptions(strength=0.0)
    ).output
    base = lerobot_export.export_lerobot(base_merged, output=tmp / "base_lerobot", **EXPORT).output
    adapter = peft_export.export_lerobot_peft(step, base=HUB, lora=LORA, **EXPORT)
    assert {
        p.relative_to(step): p.read_bytes() for p in step.rglob("*") if p.is_file() and "lerobot_peft" not in str(p)
    } == before
    return {"tmp": tmp, "step": step, "merged": merged, "base": base, "adapter": adapter}


def test_the_adapter_directory_is_what_lerobots_peft_path_reads(exports):
    out = exports["adapter"].output
    assert out == exports["step"] / "lerobot_peft"
    merged = exports["merged"]
    processors = sorted(p.name for p in merged.iterdir() if p.name.startswith("policy_"))
    names = ["adapter_config.json", "adapter_model.safetensors", "config.json", "manifest.json", *processors]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in processors:  # the processors with the step's norm stats, as the merged export writes them
        assert (out / name).read_bytes() == (merged / name).read_bytes(), name
    config, merged_config = (json.loads((d / "config.json").read_text()) for d in (out, merged))
    assert config.pop("use_peft") is True
    assert merged_config.pop("use_peft") is False
    assert list(config) == list(merged_config)  # the policy LeRobot builds on BASE
    assert config == merged_config
    lerobots = json.loads((PEFT_FIXTURES / "lerobot_default" / "config.json").read_text())
    assert list(json.loads((out / "config.json").read_text())) == list(lerobots)  # LeRobot's fields, in its order
    assert lerobots["use_peft"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["format"] == "lerobot-peft"
    assert manifest["base"] == {**HUB.to_json(), "check": None}
    assert manifest["verification"]["factors"]["max_rel_err"] < 1e-6
    assert manifest["verification"]["file"]["tensors_checked"] == len(load_file(out / "adapter_model.safetensors"))
    size = manifest["size"]
    assert size["adapter_model_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    assert size["merged_export_model_bytes"] == (merged / "model.safetensors").stat().st_size


def test_adapter_config_is_what_peft_writes_for_it(exports):
    """PEFT 0.21.2 read this adapter_config.json, wrapped LeRobot's PI0Policy with it and saved it again
    (tests/data/lerobot-0.6.1-peft/resaved): every field we write has PEFT's value, the ones we leave out are PEFT's
    neutral defaults, and its minimal `target_modules` selects exactly our modules among the policy's."""
    ours = json.loads((exports["adapter"].output / "adapter_config.json").read_text())
    peft = json.loads((PEFT_FIXTURES / "resaved" / "adapter_config.json").read_text())
    assert set(ours) <= set(peft)
    # get_peft_model resets base_model_name_or_path to the model's name_or_path (None for a policy built in place).
    differ = {k for k in ours if ours[k] != peft[k]}
    assert differ == {"target_modules", "base_model_name_or_path"}, differ
    assert peft["base_model_name_or_path"] is None
    neutral = {k: peft[k] for k in set(peft) - set(ours)}
    assert all(v in (None, False, {}, 16, "megatron.core") for v in neutral.values()), neutral
    modules = {n.rsplit(".", 1)[0] for n in load_file(exports["merged"] / "model.safetensors")}

    def selected(targets):  # PEFT's check_target_module_exists for a list: the name, or a dotted suffix of it
        return {m for m in modules if m in targets or any(m.endswith(f".{t}") for t in targets)}

    assert selected(ours["target_modules"]) == selected(peft["target_modules"]) == set(ours["target_modules"])
    for key in ours["rank_pattern"]:  # PEFT's get_pattern_key: re.match(rf"(.*\.)?({key})$", module)
        assert [m for m in modules if re.match(rf"(.*\.)?({key})$", m)] == [re.sub(r"\\(.)", r"\1", key)]


def test_safetensors_names_shapes_dtypes_are_peft_own(exports):
    """The header PEFT wrote for the same config on LeRobot's policy: the same names, shapes and dtypes (LoRA factors
    `base_model.model.<module>.lora_A/B.weight`, modules to save `base_model.model.<state-dict name>`) and metadata."""
    path = exports["adapter"].output / "adapter_model.safetensors"
    peft = json.loads((PEFT_FIXTURES / "resaved" / "header.json").read_text())
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    assert header.pop("__metadata__") == peft["__metadata__"] == {"format": "pt"}
    assert {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in header.items()} == peft["tensors"]


def test_modules_to_save_are_what_openpis_freeze_filter_left_trainable(exports, fixture_params):
    """On a hub BASE: the example's listing records which params openpi's `Pi0Config.get_freeze_filter()` left
    trainable (group `trainable_non_llm`: SigLIP, the projector, the action projections). Those, as the fewest whole
    modules, hold every one of their tensors, bitwise as the merged export; nothing of the LLM."""
    out = exports["adapter"].output
    tensors = load_file(out / "adapter_model.safetensors")
    merged = load_file(exports["merged"] / "model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())
    saved = {k.removeprefix(peft_layout.PEFT_PREFIX) for k in tensors if ".lora_" not in k}
    trainable = {p for p, e in LISTING.items() if e["group"] == "trainable_non_llm"}
    # Every saved tensor comes from a trainable leaf, and every trainable leaf's tensors are saved.
    from_leaf = _tensor_sources(exports)
    assert {from_leaf[n] for n in saved} == trainable
    assert saved == {n for n, leaf in from_leaf.items() if leaf in trainable}
    for name in saved:
        np.testing.assert_array_equal(tensors[peft_layout.PEFT_PREFIX + name], merged[name])
    assert config["modules_to_save"] == [
        "model.action_in_proj",
        "model.action_out_proj",
        "model.action_time_mlp_in",
        "model.action_time_mlp_out",
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector",
        "model.paligemma_with_expert.paligemma.model.vision_tower",
        "model.state_proj",
    ]
    assert all(any(n.startswith(m + ".") for m in config["modules_to_save"]) for n in saved)
    assert "trained by the fine-tune" in exports["adapter"].manifest["adapter"]["why_saved"]


def _plan(exports) -> peft_export.PeftPlan:
    source = peft_export.pytorch_export.lora_step_source(exports["step"], LORA)
    return peft_export.plan_lerobot_peft(
        source, HUB, "float32", EXPORT["model"], EXPORT["naming"], allow_nonstandard_dims=True
    )


def _tensor_sources(exports) -> dict[str, str]:
    """LeRobot tensor name -> the JAX leaf it is laid out from (the merged export's own layout)."""
    return {s.name: s.recipe.source for s in _plan(exports).lerobot.layout.tensors if s.recipe.source is not None}


def test_strength_zero_merge_exports_the_steps_exact_base_weights(exports, fixture_params):
    """BASE for these tests: the step merged at strength 0, then `export --format lerobot`. Every tensor is bitwise
    the step's own weight laid out by the export's recipe (bf16 frozen weights widened exactly, adapters gone)."""
    base = load_file(exports["base"] / "model.safetensors")
    specs = _plan(exports).lerobot.layout.tensors
    assert set(base) == {s.name for s in specs}
    for spec in specs:
        want = pytorch_layout.apply(
            spec.recipe, None if spec.recipe.source is None else fixture_params[spec.recipe.source]
        )
        assert base[spec.name].tobytes() == want.tobytes(), spec.name


def test_local_base_saves_only_what_differs(exports, tmp_path):
    """BASE local: every tensor compared bitwise. The step's own base: nothing differs, nothing to save. A BASE whose
    action projection differs (the fine-tune trained it away from there): that module alone."""
    same = peft_export.export_lerobot_peft(
        exports["step"], base=peft_export.BaseRef.parse(exports["base"]), output=tmp_path / "same", lora=LORA, **EXPORT
    )
    check = same.manifest["base"]["check"]
    assert check["bitwise_equal"] == check["tensors_compared"] > 0
    assert check["differ_trained"] == 0
    assert json.loads((same.output / "adapter_config.json").read_text())["modules_to_save"] is None
    assert same.manifest["base"]["base_model_name_or_path"] == str(exports["base"])
    assert same.manifest["size"]["adapter_model_bytes"] < same.manifest["size"]["merged_export_model_bytes"] / 10

    other = _base_with(exports, tmp_path / "other_base", "model.action_out_proj.weight")
    result = peft_export.export_lerobot_peft(
        exports["step"], base=peft_export.BaseRef.parse(other), output=tmp_path / "other", lora=LORA, **EXPORT
    )
    assert result.manifest["base"]["check"]["differ_trained"] == 1
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.action_out_proj"]
    saved = {k for k in load_file(result.output / "adapter_model.safetensors") if ".lora_" not in k}
    assert saved == {"base_model.model.model.action_out_proj.weight", "base_model.model.model.action_out_proj.bias"}


def _base_with(exports, out: pathlib.Path, name: str) -> pathlib.Path:
    shutil.copytree(exports["base"], out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = tensors[name] + np.float32(0.25)
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "name",
    [
        "model.paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj.weight",  # adapted
        "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.weight",  # frozen, not adapted
    ],
)
def test_a_base_whose_frozen_weights_differ_is_refused(exports, tmp_path, name):
    other = _base_with(exports, tmp_path / "base", name)
    with pytest.raises(ConfigError, match=r"is not this step's base: 1 frozen or adapted weights differ") as e:
        peft_export.export_lerobot_peft(
            exports["step"], base=peft_export.BaseRef.parse(other), output=tmp_path / "out", lora=LORA, **EXPORT
        )
    assert name in str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_policy_is_refused(exports, tmp_path):
    other = tmp_path / "base"
    shutil.copytree(exports["base"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "type": "pi05"}))
    with pytest.raises(ConfigError, match=r"not this step's base policy: its config.json has type 'pi05'"):
        peft_export.export_lerobot_peft(
            exports["step"], base=peft_export.BaseRef.parse(other), output=tmp_path / "out", lora=LORA, **EXPORT
        )
    with pytest.raises(ConfigError, match="dtype 'float32' \\(this step: 'bfloat16'\\)"):
        peft_export.export_lerobot_peft(
            exports["step"],
            base=peft_export.BaseRef.parse(exports["base"]),
            output=tmp_path / "out",
            lora=LORA,
            **{**EXPORT, "precision": "bfloat16"},
        )
    assert not (tmp_path / "out").exists()


def test_base_is_a_lerobot_directory_or_a_hub_id(tmp_path):
    assert peft_export.BaseRef.parse("lerobot/pi0_base", "main") == peft_export.BaseRef(
        "lerobot/pi0_base", None, "main"
    )
    with pytest.raises(ConfigError, match="neither a directory nor a hub id"):
        peft_export.BaseRef.parse(str(tmp_path / "missing" / "x" / "y"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a LeRobot policy directory: it has no model\.safetensors"):
        peft_export.BaseRef.parse(tmp_path)


def test_merged_directory_is_not_an_adapter_source(exports, tmp_path):
    merged = checkpoint_merge.merge_checkpoint(exports["step"], output=tmp_path / "m", lora=LORA).output
    source = peft_export.pytorch_export.merged_dir_source(merged)
    with pytest.raises(Exception, match="merged already"):
        peft_export.plan_lerobot_peft(source, HUB, "float32", EXPORT["model"], EXPORT["naming"])


def test_modules_covering_takes_whole_modules_outermost_first():
    names = ["m.a.x.weight", "m.a.x.bias", "m.a.y.weight", "m.b.weight", "m.c.z.weight"]
    assert peft_layout.modules_covering(names, {"m.a.x.weight", "m.a.x.bias", "m.a.y.weight"}) == ("m.a",)
    assert peft_layout.modules_covering(names, {"m.a.x.weight", "m.a.x.bias"}) == ("m.a.x",)
    assert peft_layout.whole_modules(names, {"m.a.x.bias"}) == {"m.a.x.weight", "m.a.x.bias"}
    with pytest.raises(peft_layout.PeftLayoutError, match="also holds tensors that are not saved"):
        peft_layout.modules_covering(names, {"m.a.x.weight"})


def _full_size(name: str):
    """openpi's shipped LoRA model `name` at full size, shapes only (tests/data/openpi-15a9616/trees: `frozen` is
    openpi's own freeze filter; frozen leaves bfloat16 as train.py saves them), its adapters and merged layout."""
    from openpi_merge_plugin.checkpoint import lerobot_layout
    from openpi_merge_plugin.lora.adapters import ShapeDtype
    from openpi_merge_plugin.merge import engine
    from openpi_merge_plugin.pipeline import export_model

    params = json.loads((REPO / "tests/data/openpi-15a9616/trees" / f"{name}.json").read_text())["params"]
    tree = {p: ShapeDtype(tuple(e["shape"]), "bfloat16" if e["frozen"] else "float32") for p, e in params.items()}
    adapters = engine.plan(tree, checkpoint_merge.resolve_lora(tree, checkpoint_merge.LoRASource()))
    structure = engine.merged_structure(tree, adapters, engine.MergeOptions())
    shapes = {p: (sd.shape, sd.dtype) for p, sd in structure.items()}
    fast = lerobot_layout.detect_kind(shapes) == "pi0_fast"
    merged = lerobot_layout.build_lerobot_layout(
        shapes,
        paligemma=export_model.dims_from_params(structure, ""),
        action_expert=None if fast else export_model.dims_from_params(structure, "_1"),
        action_dim=None if fast else structure["action_in_proj/kernel"].shape[0],
    )
    return params, tree, adapters, merged


@pytest.mark.parametrize("name", ["pi0_lora", "pi05_lora"])
def test_full_size_adapter_of_openpis_default_lora_variants(name):
    """Shapes only, at full size: every q/k/v/o/gate/up/down of both experts in every layer is a LoRA target with
    openpi's rank structure (gemma_2b_lora 16/16, gemma_300m_lora 32/32: scale 1, so alpha = PEFT's rank), and the
    modules to save are exactly the leaves openpi's freeze filter leaves trainable (the trees' `frozen`)."""
    params, tree, adapters, merged = _full_size(name)
    adapter = peft_layout.build_peft_layout(merged, adapters, tree, peft_layout.trained_tensors(merged, tree, adapters))
    assert len(adapter.targets) == 2 * 18 * 7
    ranks = {}
    for t in adapter.targets:
        expert = "expert" if ".gemma_expert." in t.module else "paligemma"
        ranks.setdefault((expert, t.module.rsplit(".", 1)[1]), set()).add(t.rank)
        assert t.alpha == t.rank  # scale 1: alpha 16 / rank 16, alpha 32 / rank 32; the MLP unscaled anyway
    assert ranks == {
        **{("paligemma", m): {16} for m in ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
        ("paligemma", "q_proj"): {8 * 16},
        **{("expert", m): {32} for m in ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
        ("expert", "q_proj"): {8 * 32},
    }
    trainable = {p for p, e in params.items() if not e["frozen"] and "lora" not in p}
    sources = {s.recipe.source for s in adapter.saved}
    assert sources == trainable
    projections = ["action_in_proj", "action_out_proj"]
    projections += (
        ["time_mlp_in", "time_mlp_out"] if name == "pi05_lora" else ["action_time_mlp_in", "action_time_mlp_out"]
    )
    projections += [] if name == "pi05_lora" else ["state_proj"]
    paligemma = "model.paligemma_with_expert.paligemma.model."
    assert sorted(adapter.modules_to_save) == sorted(
        [f"model.{p}" for p in projections] + [paligemma + "multi_modal_projector", paligemma + "vision_tower"]
    )
    config = adapter.lora_config("lerobot/pi0_base")
    assert len(config["target_modules"]) == len(config["rank_pattern"]) == len(config["alpha_pattern"]) == 252


def test_pi0_fast_gets_no_peft_adapter():
    """pi0-FAST stays refused for LeRobot (its decoding differs, docs/lerobot.md), adapters included."""
    _, tree, adapters, merged = _full_size("pi0_fast_lora")
    assert merged.kind == "pi0_fast"
    with pytest.raises(peft_layout.PeftLayoutError, match="pi0_fast policy is not supported"):
        peft_layout.build_peft_layout(merged, adapters, tree, set())


@pytest.mark.parametrize("bug", ["alpha", "attn_vec_per_head"])
def test_factors_that_are_not_openpis_are_not_written(exports, tmp_path, monkeypatch, bug):
    """The writer checks every target and layer against openpi's own two LoRA einsums on random probes: a scale off
    (the textbook alpha / rank where openpi does not scale), or attn_vec_einsum's lora_b averaged instead of summed
    over heads, stops it before anything is committed."""
    from openpi_merge_plugin.errors import CheckpointError
    from openpi_merge_plugin.lora import peft_adapter

    if bug == "alpha":
        monkeypatch.setattr(peft_adapter, "peft_alpha", lambda scale, rank: 2.0 * scale * rank)
    else:
        monkeypatch.setattr(peft_adapter, "_sum_alone", _mean_alone)
    with pytest.raises(CheckpointError, match="PEFT factors off openpi's"):
        peft_export.export_lerobot_peft(exports["step"], base=HUB, output=tmp_path / "out", lora=LORA, **EXPORT)
    assert not (tmp_path / "out").exists()


def _mean_alone(x, labels, keep):
    alone = tuple(i for i, c in enumerate(labels) if c not in keep)
    if not alone:
        return x, labels
    return x.mean(axis=alone), "".join(c for i, c in enumerate(labels) if i not in alone)
