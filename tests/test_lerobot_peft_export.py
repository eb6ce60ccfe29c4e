"""The LeRobot PEFT adapter of the bundled example (`export --format lerobot-peft`, issue 32), written without LeRobot,
torch or openpi.

What LeRobot and PEFT do with it is tests/test_lerobot_peft_gated.py (and *_runs_gated.py); here: the files against
what PEFT 0.21.2 and LeRobot 0.6.1 themselves wrote (tests/data/lerobot-0.6.1-peft/, see its PROVENANCE.md), what
goes in `modules_to_save` and why (openpi's freeze filter, recorded in the example's params listing), the checks of a
local BASE, where BASE comes from, the output's place, merge on save, and the refusals.
"""

import dataclasses
import json
import pathlib
import re
import shutil
import struct
import types

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import REPO
from helpers import tree_digest
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import params_io
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.cli import app as cli
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.errors import OutputRefusedError
from openpi_merge_plugin.formats import lerobot_peft
from openpi_merge_plugin.formats import lerobot_peft_layout as peft_layout
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.openpi_glue import merged_item
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export

PEFT_FIXTURES = REPO / "tests" / "data" / "lerobot-0.6.1-peft"
EXPORT_TINY = REPO / "tests" / "data" / "openpi-15a9616" / "export-tiny"
MODEL = json.loads((FIXTURE / "model_config.json").read_text())
LISTING = json.loads((FIXTURE / "params_listing.json").read_text())
LORA = checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
HORIZON = MODEL["pi0_config"]["action_horizon"]
OPTIONS = ExportOptions(precision="float32", action_horizon=HORIZON, device="cpu", allow_nonstandard_dims=True)
HUB = lerobot_peft.BaseRef.parse("lerobot/pi0_base")


def _cli(src, *flags: str) -> list[str]:
    """`openpi-merge-lora export SRC ...` as the tests' adapters and BASE are made."""
    argv = ["export", str(src), "--action-horizon", str(HORIZON), "--precision", "float32", "--device", "cpu"]
    return [*argv, "--allow-nonstandard-dims", "--no-progress", *flags]


def _peft(step, base, output=None, **options) -> export.ExportResult:
    """The adapter of `step` on `base`, through the API (`export.export(..., "lerobot-peft")`)."""
    given = dataclasses.replace(OPTIONS, base=str(base), **options)
    return export.export(step, "lerobot-peft", options=given, lora=LORA, output=output)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """The example's merged LeRobot export, BASE (the step's own weights: merged at strength 0, then exported) and the
    adapter on a hub BASE, by the command line, into the step's own slot."""
    tmp = tmp_path_factory.mktemp("peft-export")
    step = tmp / "checkpoint" / "2"
    shutil.copytree(FIXTURE / "checkpoint" / "2", step)
    before = tree_digest(step)
    merged = export.export(step, "lerobot", options=OPTIONS, lora=LORA, output=tmp / "merged_lerobot").output
    base_merged = tmp / "base_merged"
    assert cli.main([str(step), "--lora-config", str(FIXTURE_LORA_CONFIG), "--strength", "0", "--output",
                     str(base_merged), "--no-progress"]) == 0  # fmt: skip
    assert cli.main(_cli(base_merged, "--format", "lerobot", "--output", str(tmp / "base_lerobot"))) == 0
    base = tmp / "base_lerobot"
    assert cli.main(_cli(step, "--format", "lerobot-peft", "--base", "lerobot/pi0_base",
                         "--lora-config", str(FIXTURE_LORA_CONFIG))) == 0  # fmt: skip
    out = step / "lerobot_peft"
    adapter = export.ExportResult(out, json.loads((out / "manifest.json").read_text()))
    assert {k: v for k, v in tree_digest(step).items() if not k.startswith("lerobot_peft/")} == before
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


def _tensor_sources(exports) -> dict[str, str]:
    """LeRobot tensor name -> the JAX leaf it is laid out from (the merged export's own layout)."""
    return {s.name: s.recipe.source for s in _merged_layout(exports["step"]).tensors if s.recipe.source is not None}


def _merged_layout(step: pathlib.Path):
    """The layout of the merged LeRobot export of `step` (its leaves but the adapters)."""
    from openpi_merge_plugin.formats import lerobot
    from openpi_merge_plugin.pipeline import model_facts

    tree = sources.OrbaxSource(step / "params").tree
    weights = {p: sd for p, sd in tree.items() if "lora" not in p}
    facts = model_facts.resolve(weights, {}, step / "assets", config=None, options=OPTIONS)
    return lerobot.plan_lerobot(weights, facts, OPTIONS, what=str(step)).layout


def test_strength_zero_merge_exports_the_steps_exact_base_weights(exports, fixture_params):
    """BASE made of a LoRA step's own weights: `openpi-merge-lora STEP --strength 0` then `export --format lerobot`
    (the export's merge of a LoRA step is at strength 1). Every tensor is bitwise the step's own weight laid out by the
    export's recipe (bf16 frozen weights widened exactly, adapters gone)."""
    base = load_file(exports["base"] / "model.safetensors")
    specs = _merged_layout(exports["step"]).tensors
    assert set(base) == {s.name for s in specs}
    for spec in specs:
        want = layout.apply(spec.recipe, None if spec.recipe.source is None else fixture_params[spec.recipe.source])
        assert base[spec.name].tobytes() == want.tobytes(), spec.name


def test_local_base_saves_only_what_differs(exports, tmp_path):
    """BASE local: every tensor compared bitwise. The step's own base: nothing differs, nothing to save; the
    precision is BASE's. A BASE whose action projection differs (the fine-tune trained it away from there): that
    module alone."""
    same = _peft(exports["step"], exports["base"], output=tmp_path / "same", precision=None)
    check = same.manifest["base"]["check"]
    assert check["bitwise_equal"] == check["tensors_compared"] > 0
    assert check["differ_trained"] == 0
    assert json.loads((same.output / "adapter_config.json").read_text())["modules_to_save"] is None
    assert same.manifest["base"]["base_model_name_or_path"] == str(exports["base"])
    assert same.manifest["precision"] == json.loads((exports["base"] / "config.json").read_text())["dtype"]
    assert same.manifest["size"]["adapter_model_bytes"] < same.manifest["size"]["merged_export_model_bytes"] / 10

    other = _base_with(exports, tmp_path / "other_base", "model.action_out_proj.weight")
    result = _peft(exports["step"], other, output=tmp_path / "other")
    assert result.manifest["base"]["check"]["differ_trained"] == 1
    config = json.loads((result.output / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.action_out_proj"]
    saved = {k for k in load_file(result.output / "adapter_model.safetensors") if ".lora_" not in k}
    assert saved == {"base_model.model.model.action_out_proj.weight", "base_model.model.model.action_out_proj.bias"}


def _base_with(exports, out: pathlib.Path, name: str, change=lambda x: x + np.float32(0.25)) -> pathlib.Path:
    shutil.copytree(exports["base"], out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, out / "model.safetensors")
    return out


@pytest.mark.parametrize(
    "name",
    [
        "model.paligemma_with_expert.paligemma.model.language_model.layers.1.self_attn.q_proj.weight",  # adapted
        "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.weight",  # frozen, not adapted
    ],
)
def test_a_base_whose_frozen_weights_differ_is_refused(exports, tmp_path, capsys, name):
    """Through the API and the command line: one `error:` line naming the weight, before anything is written."""
    other = _base_with(exports, tmp_path / "base", name)
    with pytest.raises(ConfigError, match=r"is not this step's base: 1 frozen or adapted weights differ") as e:
        _peft(exports["step"], other, output=tmp_path / "out")
    assert name in str(e.value)
    assert "export the base checkpoint the fine-tune started from" in str(e.value)
    assert not (tmp_path / "out").exists()
    before = tree_digest(tmp_path)
    step_before = tree_digest(exports["step"])
    argv = _cli(exports["step"], "--format", "lerobot-peft", "--base", str(other), "--output", str(tmp_path / "out"))
    assert cli.main([*argv, "--lora-config", str(FIXTURE_LORA_CONFIG)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    assert "is not this step's base" in err[0], err
    assert name in err[0], err
    assert tree_digest(tmp_path) == before  # nothing staged, nothing written beside the output
    assert tree_digest(exports["step"]) == step_before


def test_a_base_holding_what_the_frozen_weights_were_rounded_from_is_refused_saying_so(exports, tmp_path):
    """openpi's train.py keeps frozen weights in bfloat16: a BASE of the float32 values they were rounded from is not
    the step's base, and the refusal says how to make one that is."""
    name = "model.paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.weight"
    nudged = _base_with(exports, tmp_path / "base", name, change=lambda x: x + np.spacing(x))  # still rounds to x
    with pytest.raises(ConfigError, match=r"BASE holds values the step's bfloat16 frozen weights are the rounding"):
        _peft(exports["step"], nudged, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_policy_is_refused(exports, tmp_path):
    other = tmp_path / "base"
    shutil.copytree(exports["base"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "type": "pi05"}))
    with pytest.raises(ConfigError, match=r"not this step's base policy: its config.json has type 'pi05'"):
        _peft(exports["step"], other, output=tmp_path / "out")
    with pytest.raises(ConfigError, match="dtype 'float32' \\(this step: 'bfloat16'\\)"):
        _peft(exports["step"], exports["base"], output=tmp_path / "out", precision="bfloat16")
    assert not (tmp_path / "out").exists()


def test_base_is_a_lerobot_directory_or_a_hub_id(exports, tmp_path, capsys):
    assert lerobot_peft.BaseRef.parse("lerobot/pi0_base", "main") == lerobot_peft.BaseRef(
        "lerobot/pi0_base", None, "main"
    )
    with pytest.raises(ConfigError, match="neither a directory nor a hub id"):
        lerobot_peft.BaseRef.parse(str(tmp_path / "missing" / "x" / "y"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"not a LeRobot policy directory: it has no model\.safetensors"):
        lerobot_peft.BaseRef.parse(tmp_path)
    with pytest.raises(ConfigError, match="--base-revision applies to a hub id"):
        lerobot_peft.BaseRef.parse(exports["base"], "main")
    step = exports["step"]
    before = tree_digest(step)
    for flags, says in (
        ([], "--format lerobot-peft needs --base BASE"),
        (["--base", str(tmp_path / "nope" / "x" / "y")], "neither a directory nor a hub id"),
        (["--base", "lerobot/pi0_base", "--model-dtype", "float32"], "--model-dtype is for --format pytorch"),
    ):
        argv = _cli(step, "--format", "lerobot-peft", "--lora-config", str(FIXTURE_LORA_CONFIG), *flags)
        assert cli.main([*argv, "--output", str(tmp_path / "out")]) == 1, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("error: "), err
        assert says in err[0], (flags, err)
    assert tree_digest(step) == before
    assert not (tmp_path / "out").exists()


def test_only_a_lora_step_gives_an_adapter(exports, tmp_path):
    """A merged checkpoint or a checkpoint without adapters has no adapters to write: refused before any work."""
    merged = checkpoint_merge.merge_checkpoint(exports["step"], output=tmp_path / "m", lora=LORA).output
    with pytest.raises(ConfigError, match="is a merged checkpoint: --format lerobot-peft writes a LoRA step's adapt"):
        export.export(merged, "lerobot-peft", options=dataclasses.replace(OPTIONS, base="lerobot/pi0_base"))
    plain = tmp_path / "pi0_base"
    shutil.copytree(EXPORT_TINY / "pi0_base", plain)
    with pytest.raises(ConfigError, match="has no LoRA adapters: --format lerobot-peft writes a LoRA step's adapt"):
        export.export(plain, "lerobot-peft", options=dataclasses.replace(OPTIONS, base="lerobot/pi0_base"))
    assert sorted(p.name for p in plain.iterdir()) == ["assets", "params"]


def test_the_output_never_touches_base(exports, tmp_path):
    """A local BASE is read: the output is never BASE, inside it or around it (`Format.reads`)."""
    base = tmp_path / "base"
    shutil.copytree(exports["base"], base)
    before = tree_digest(tmp_path)
    for output, says in ((base, "is the base policy (--base) itself"), (base / "adapter", "lies inside the base"),
                         (tmp_path, "contains the base policy (--base)")):  # fmt: skip
        with pytest.raises(OutputRefusedError, match=re.escape(says)):
            _peft(exports["step"], base, output=output)
    assert tree_digest(tmp_path) == before


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
    from openpi_merge_plugin.formats import lerobot_layout
    from openpi_merge_plugin.lora.adapters import ShapeDtype
    from openpi_merge_plugin.merge import engine

    params = json.loads((REPO / "tests/data/openpi-15a9616/trees" / f"{name}.json").read_text())["params"]
    tree = {p: ShapeDtype(tuple(e["shape"]), "bfloat16" if e["frozen"] else "float32") for p, e in params.items()}
    adapters = engine.plan(tree, checkpoint_merge.resolve_lora(tree, checkpoint_merge.LoRASource()))
    structure = engine.merged_structure(tree, adapters, engine.MergeOptions())
    shapes = {p: (sd.shape, sd.dtype) for p, sd in structure.items()}
    fast = lerobot_layout.detect_kind(shapes) == "pi0_fast"
    merged = lerobot_layout.build_lerobot_layout(
        shapes,
        paligemma=layout.dims_from_params(structure, ""),
        action_expert=None if fast else layout.dims_from_params(structure, "_1"),
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


@pytest.mark.parametrize("bug", ["alpha", "attn_vec_one_head"])
def test_factors_that_are_not_openpis_are_not_written(exports, tmp_path, monkeypatch, bug):
    """The export checks every target and layer of the file it wrote against openpi's own two LoRA einsums on random
    probes: a scale off (alpha twice openpi's), or attn_vec_einsum's lora_b taken from one head instead of summed
    over heads, stops it before anything is committed."""
    from openpi_merge_plugin.lora import peft_adapter

    if bug == "alpha":
        monkeypatch.setattr(peft_adapter, "peft_alpha", lambda scale, rank: 2.0 * scale * rank)
    else:
        real = peft_adapter.Factoring.ops

        def one_head(self, factor):
            return tuple(("take", (arg[0], 0)) if op == "sum" else (op, arg) for op, arg in real(self, factor))

        monkeypatch.setattr(peft_adapter.Factoring, "ops", one_head)
    with pytest.raises(CheckpointError, match="PEFT factors off openpi's"):
        _peft(exports["step"], "lerobot/pi0_base", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def _lora_step_from(base_checkpoint: pathlib.Path, step: pathlib.Path) -> pathlib.Path:
    """A LoRA fine-tune's step as openpi's train.py saves one that started from `base_checkpoint` (a released-layout
    checkpoint): its params with the freeze filter's selection (every LLM weight, `.*llm.*`) cast to bfloat16, rank-2
    adapters on both experts' attention, the rest as it is (untrained here); the checkpoint's assets."""
    rng = np.random.default_rng(3)
    source = sources.OrbaxSource(base_checkpoint / "params")
    flat = {p: (a.astype(ml_dtypes.bfloat16) if "/llm/" in p else a) for p, a in source.read(source.tree).items()}
    attn, rank = "PaliGemma/llm/layers/attn/", 2
    for sfx in ("", "_1"):
        depth, heads, width, head_dim = flat[f"{attn}q_einsum{sfx}/w"].shape
        kv_heads = flat[f"{attn}kv_einsum{sfx}/w"].shape[2]
        shapes = {
            f"q_einsum{sfx}": ((depth, heads, width, rank), (depth, heads, rank, head_dim)),
            f"kv_einsum{sfx}": ((depth, 2, kv_heads, width, rank), (depth, 2, kv_heads, rank, head_dim)),
            f"attn_vec_einsum{sfx}": ((depth, heads, head_dim, rank), (depth, heads, rank, width)),
        }
        for module, (a, b) in shapes.items():
            flat[f"{attn}{module}/lora_a"] = (0.1 * rng.standard_normal(a)).astype(np.float32)
            flat[f"{attn}{module}/lora_b"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
    step.mkdir(parents=True)
    params_io.save_params(step / "params", flat)
    shutil.copytree(base_checkpoint / "assets", step / "assets")
    return step


def test_base_from_the_base_checkpoint_the_fine_tune_started_from(tmp_path):
    """BASE by `export BASE_CHECKPOINT --format lerobot` (issue 31's export of a checkpoint without adapters): a
    checkpoint that holds the frozen weights as the fine-tune holds them (bfloat16) is BASE, tensor for tensor, and
    gives the same BASE as the fine-tune's own weights (`--strength 0`); one in float32, whose values train.py rounded
    to bfloat16, is refused, saying how to make BASE."""
    released = tmp_path / "pi0_base"  # float32 throughout, as tests/data/openpi-15a9616/export-tiny writes it
    shutil.copytree(EXPORT_TINY / "pi0_base", released)
    step = _lora_step_from(released, tmp_path / "run" / "9")
    as_trained = tmp_path / "pi0_base_bf16"  # the same weights, the LLM stored in bfloat16
    source = sources.OrbaxSource(released / "params")
    leaves = source.read(source.tree)
    params_io.save_params(as_trained / "params", {p: (a.astype(ml_dtypes.bfloat16) if "/llm/" in p else a)
                                                  for p, a in leaves.items()})  # fmt: skip
    shutil.copytree(released / "assets", as_trained / "assets")
    lora = ["--alpha", "4"]
    for ckpt in (released, as_trained):
        assert cli.main(_cli(ckpt, "--format", "lerobot")) == 0
    before = tree_digest(tmp_path)
    with pytest.raises(ConfigError, match=r"BASE holds values the step's bfloat16 frozen weights are the rounding"):
        export.export(step, "lerobot-peft", options=dataclasses.replace(OPTIONS, base=str(released / "lerobot")),
                      lora=checkpoint_merge.LoRASource(alpha=4.0))  # fmt: skip
    assert tree_digest(tmp_path) == before
    assert cli.main(_cli(step, "--format", "lerobot-peft", "--base", str(as_trained / "lerobot"), *lora)) == 0
    manifest = json.loads((step / "lerobot_peft" / "manifest.json").read_text())
    check = manifest["base"]["check"]
    assert check["bitwise_equal"] == check["tensors_compared"] > 0
    assert manifest["adapter"]["modules_to_save"] == []
    assert manifest["adapter"]["lora_targets"] == 2 * 2 * 4  # two experts, two layers, q/k/v/o
    # The other route to BASE, from the step's own weights: the same file.
    assert cli.main([str(step), *lora, "--strength", "0", "--output", str(tmp_path / "w"), "--no-progress"]) == 0
    assert cli.main(_cli(tmp_path / "w", "--format", "lerobot", "--output", str(tmp_path / "base"))) == 0
    own = load_file(tmp_path / "base" / "model.safetensors")
    assert own.keys() == (ref := load_file(as_trained / "lerobot" / "model.safetensors")).keys()
    assert all(own[k].tobytes() == ref[k].tobytes() for k in own)


@pytest.mark.parametrize("local", [False, True])
def test_merge_on_save_writes_the_steps_adapter_beside_the_merge(exports, tmp_path, fixture_params, monkeypatch, local):
    """`--merge-lora.export-lerobot-peft --merge-lora.export-base BASE`: the params the merge read, as an adapter, in
    <step>/lerobot_peft: the same factors and modules to save as the offline export of the same step."""
    fixture_lora = checkpoint_merge.resolve_lora(sources.OrbaxSource(exports["step"] / "params").tree, LORA)
    monkeypatch.setattr(openpi_configs, "lora_from_model", lambda model, config_name=None: fixture_lora)
    real = export.write_beside_merge

    def write(directory, merged_dir, to, train_config, options, output_path, **kw):
        options = dataclasses.replace(options, allow_nonstandard_dims=True)  # the fixture's dims are not LeRobot's
        return real(directory, merged_dir, to, train_config, options, output_path, **kw)

    monkeypatch.setattr(export, "write_beside_merge", write)
    model = types.SimpleNamespace(
        paligemma_variant="fx_lora_a", action_expert_variant="fx_lora_b", action_horizon=HORIZON, max_token_len=48
    )
    model.dtype, model.pi05 = "bfloat16", False
    data = types.SimpleNamespace(assets=types.SimpleNamespace(asset_id=None), repo_id="robot", create=None)
    base = str(exports["base"]) if local else "lerobot/pi0_base"
    options = MergeOnSaveOptions(export_lerobot_peft=True, export_base=base)
    config = types.SimpleNamespace(name="fixture", model=model, data=data, merge_lora=options)
    norm = (exports["step"] / "assets").rglob("norm_stats.json")

    def save_assets(assets):  # as openpi's callback writes the run's norm stats into the merge's assets/
        (assets / "robot").mkdir(parents=True)
        (assets / "robot" / "norm_stats.json").write_bytes(next(norm).read_bytes())

    step = tmp_path / "5"
    request = merged_item.MergeRequest(sources.unflatten(dict(fixture_params)), save_assets, config, 5, step)
    staging = merged_item.write_staged(request)
    assert request.outcome.error is None, request.outcome.error
    merged_item.move_into(staging, step / "merged")
    out = step / "lerobot_peft"
    assert not (out / _output.FAILURE_MARKER).exists(), (out / _output.FAILURE_MARKER).read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["source"]["lora_step"] == str(step)
    assert manifest["source"]["norm_stats"] == "assets/robot/norm_stats.json"
    assert manifest["lora_config"] == fixture_lora.to_json()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]  # nothing staged left
    offline = exports["adapter"].output if not local else _peft(exports["step"], base, output=tmp_path / "off").output
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (offline / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text())["use_peft"] is True
