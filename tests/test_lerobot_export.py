"""`openpi-merge-lora export --format lerobot` on the bundled fixture (runs without LeRobot, openpi and torch).

The fixture is a real pi0 tree whose dims LeRobot does not build (it loads only into a LeRobot patched to them,
as tests/data/lerobot-0.6.1/make_fixtures.py patches it), so the export is asked for nonstandard dims. That the
names, shapes, dtypes and side files are LeRobot's own is tests/test_lerobot_layout.py.
"""

import dataclasses
import json
import re
import shutil
import types

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import REPO
from helpers import write_step
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.cli import app as cli
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.formats import lerobot as lerobot_export
from openpi_merge_plugin.formats import lerobot_files
from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as pytorch_layout
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.openpi_glue import merged_item
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export
from openpi_merge_plugin.pipeline import model_facts

MODEL = json.loads((FIXTURE / "model_config.json").read_text())["pi0_config"]
HORIZON = ExportOptions(action_horizon=MODEL["action_horizon"], allow_nonstandard_dims=True)
NORM_STATS = REPO / "tests" / "data" / "lerobot-0.6.1" / "norm_stats.json"
TREES = REPO / "tests" / "data" / "openpi-15a9616" / "trees"


@pytest.fixture
def merged(step_dir, fixture_lora):
    return checkpoint_merge.merge_checkpoint(step_dir, lora=fixture_lora).output


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_export_of_a_merged_checkpoint_holds_every_tensor_and_lerobots_files(merged, precision):
    before = {p.relative_to(merged): p.read_bytes() for p in merged.rglob("*") if p.is_file()}
    result = export.export(merged, "lerobot", options=dataclasses.replace(HORIZON, precision=precision))
    out = merged.parent / "merged_lerobot"
    assert result.output == out
    kind_files = lerobot_files.state_file_names(lerobot_files.PolicySpec("pi0", "", "", "", 1, 1, 1, 1, (), 1, 1))
    names = ["config.json", "manifest.json", "model.safetensors", "policy_preprocessor.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "policy_postprocessor.json", *kind_files])
    assert {p.relative_to(merged): p.read_bytes() for p in merged.rglob("*") if p.is_file()} == before

    source = sources.OrbaxSource(merged / "params")
    params = source.read(source.tree)
    tensors = load_file(out / "model.safetensors")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() is None  # LeRobot's save_model writes none: nothing is tied
    bf16 = pytorch_layout.ml_dtypes.bfloat16
    # Every tensor: LeRobot's name (model. + PI0Pytorch's), its dtype rule, its values from the merged params.
    q = params["PaliGemma/llm/layers/attn/q_einsum_1/w"][1].astype(np.float32)  # (heads, width, head_dim)
    got_q = tensors["model.paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"]
    want_q = q.transpose(0, 2, 1).reshape(-1, q.shape[1])
    if precision == "bfloat16":
        assert got_q.dtype == bf16
        want_q = want_q.astype(bf16)
    np.testing.assert_array_equal(got_q, want_q)
    # Kept float32 in LeRobot's bf16 model, and exact: the vision tower, the norms, the action projections.
    for name, leaf, transpose in (
        ("model.action_in_proj.weight", "action_in_proj/kernel", True),
        ("model.paligemma_with_expert.paligemma.model.language_model.norm.weight", "PaliGemma/llm/final_norm/scale", 0),
        (
            "model.paligemma_with_expert.paligemma.model.multi_modal_projector.linear.weight",
            "PaliGemma/img/head/kernel",
            True,
        ),
    ):
        want = params[leaf].astype(np.float32)
        assert tensors[name].dtype == np.float32, name
        np.testing.assert_array_equal(tensors[name], want.T if transpose else want)
    embed = "model." + pytorch_layout.EMBED_TOKENS
    assert tensors[embed].tobytes() == tensors["model." + pytorch_layout.LM_HEAD].tobytes()  # openpi ties them
    assert not np.any(tensors["model." + pytorch_layout.EXPERT_LM_HEAD].astype(np.float32))

    config = json.loads((out / "config.json").read_text())
    saved = json.loads((REPO / "tests/data/lerobot-0.6.1/saved/pi0/config.json").read_text())
    assert list(config) == list(saved)  # LeRobot's PI0Config fields, in its order
    assert config["type"] == "pi0"
    assert (config["paligemma_variant"], config["action_expert_variant"]) == ("gemma_2b", "gemma_300m")
    assert config["dtype"] == precision
    assert config["chunk_size"] == config["n_action_steps"] == MODEL["action_horizon"]
    assert config["max_state_dim"] == config["max_action_dim"] == MODEL["action_dim"]
    assert config["tokenizer_max_length"] == MODEL["max_token_len"]
    assert config["normalization_mapping"] == {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}
    openpi_stats = json.loads((merged / "assets/fixture_robot/norm_stats.json").read_text())["norm_stats"]
    assert config["input_features"]["observation.state"]["shape"] == [len(openpi_stats["state"]["mean"])]
    assert config["output_features"]["action"]["shape"] == [len(openpi_stats["actions"]["mean"])]
    for name in kind_files:
        stats = load_file(out / name)
        for stat in ("mean", "std", "q01", "q99"):
            np.testing.assert_array_equal(stats[f"observation.state.{stat}"], np.float32(openpi_stats["state"][stat]))
            np.testing.assert_array_equal(stats[f"action.{stat}"], np.float32(openpi_stats["actions"][stat]))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["format"] == "lerobot"
    assert manifest["precision"] == precision
    assert manifest["source"]["merged_on_the_way"] is False
    assert manifest["source"]["norm_stats"] == "assets/fixture_robot/norm_stats.json"
    assert manifest["verification"]["file"]["tensors_checked"] == len(tensors)
    assert manifest["verification"]["merge"]["verified"] is True
    assert "paligemma_dims" in manifest["nonstandard_dims"]
    assert manifest["lora_config"] == json.loads((merged / "manifest.json").read_text())["lora_config"]


def test_export_of_a_lora_step_merges_on_the_way_into_step_merged_lerobot(step_dir, merged):
    from_merged = export.export(merged, "lerobot", output=step_dir.parent / "a", options=HORIZON)
    shutil.rmtree(merged)
    before = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    from_step = export.export(
        step_dir, "lerobot", options=HORIZON, lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
    )
    assert from_step.output == step_dir / "merged_lerobot"
    after = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    assert {p: b for p, b in after.items() if p.parts[0] != "merged_lerobot"} == before
    assert from_step.manifest["source"]["merged_on_the_way"] is True
    for name in from_merged.manifest["files"]:
        if name != "manifest.json":
            assert (from_step.output / name).read_bytes() == (from_merged.output / name).read_bytes(), name
    assert not [p for p in step_dir.parent.rglob("*") if ".tmp" in p.name]


def test_dims_lerobot_cannot_build_are_refused_before_any_work(merged):
    with pytest.raises(MergeError, match=r"LeRobot 0.6.1 builds only gemma_2b / gemma_300m.*allow-nonstandard-dims"):
        export.export(merged, "lerobot", options=dataclasses.replace(HORIZON, allow_nonstandard_dims=False))
    assert not (merged.parent / "merged_lerobot").exists()
    assert not list(merged.parent.glob(".merged_lerobot*"))


def test_norm_stats_are_found_as_openpi_finds_them_or_refused(merged, tmp_path):
    assets = merged / "assets"
    mine = assets / "fixture_robot" / "norm_stats.json"

    def find(config_asset_id=None, **options):
        return model_facts.find_norm_stats(assets, ExportOptions(**options), config_asset_id)[0]

    assert find() == mine  # the only one
    assert find("fixture_robot") == find("other") == mine  # the config's, else the only one there
    assert find(asset_id="fixture_robot") == mine
    assert find(norm_stats=NORM_STATS) == NORM_STATS
    with pytest.raises(MergeError, match="no norm stats for asset_id 'other'"):
        find(asset_id="other")  # given explicitly: it must be there
    two = tmp_path / "assets"
    for name in ("a", "b"):
        (two / name).mkdir(parents=True)
        shutil.copy(NORM_STATS, two / name / "norm_stats.json")
    path, missing = model_facts.find_norm_stats(two, ExportOptions(), None)
    assert path is None
    assert re.search(r"has 2 \(a, b\): pass --asset-id", missing)
    assert model_facts.find_norm_stats(two, ExportOptions(), "b")[0] == two / "b" / "norm_stats.json"
    path, missing = model_facts.find_norm_stats(None, ExportOptions(), "b")
    assert path is None
    assert "the checkpoint has no assets/: pass --norm-stats FILE" in missing
    (tmp_path / "empty").mkdir()
    assert (
        "has none: pass --norm-stats FILE" in model_facts.find_norm_stats(tmp_path / "empty", ExportOptions(), None)[1]
    )


def _plan(tree_name, tmp_path, action_dim=None, **kw):
    params = json.loads((TREES / f"{tree_name}.json").read_text())["params"]
    tree = {p: ShapeDtype(tuple(v["shape"]), v["dtype"]) for p, v in params.items()}
    (tmp_path / "assets" / "robot").mkdir(parents=True, exist_ok=True)
    shutil.copy(NORM_STATS, tmp_path / "assets" / "robot" / "norm_stats.json")
    options = ExportOptions(precision="bfloat16", action_horizon=10, **kw)
    facts = model_facts.resolve(tree, {}, tmp_path / "assets", config=None, options=options)
    facts = dataclasses.replace(facts, action_dim=action_dim)
    return lerobot_export.plan_lerobot(tree, facts, options, what="t")


def test_pi0_fast_is_planned_from_its_own_tree_and_refused_by_the_one_switch(tmp_path, monkeypatch):
    with pytest.raises(MergeError, match=r"pi0-FAST is not exported for LeRobot: .*appends a BOS token"):
        _plan("pi0_fast", tmp_path, action_dim=7)  # refused as shipped (docs/lerobot.md: LeRobot's decode differs)
    monkeypatch.setattr(lerobot_export, "PI0_FAST_REFUSED", None)  # the layout stays ready for a LeRobot that agrees
    with pytest.raises(MergeError, match="actions have 7 dims, pi0-FAST's action_dim is 32"):
        _plan("pi0_fast", tmp_path, action_dim=32)  # Pi0FASTConfig's default; these stats have 7
    plan = _plan("pi0_fast", tmp_path)  # without openpi's config: the norm stats' action dim
    assert plan.spec.max_dim == 7
    plan = _plan("pi0_fast", tmp_path, action_dim=7)
    assert (plan.spec.kind, plan.spec.max_dim, plan.spec.tokenizer_max_length) == ("pi0_fast", 7, 250)
    assert plan.spec.normalization_mapping()["ACTION"] == "QUANTILES"  # openpi: quantiles for all but pi0
    assert (len(plan.layout), plan.layout.nonstandard_dims) == (604, {})
    monkeypatch.setattr(lerobot_export, "PI0_FAST_REFUSED", "LeRobot's decoding differs")
    with pytest.raises(MergeError, match="pi0-FAST is not exported for LeRobot: LeRobot's decoding differs"):
        _plan("pi0_fast", tmp_path, action_dim=7)
    assert _plan("pi05", tmp_path).spec.kind == "pi05"  # the switch is pi0-FAST's only


def test_norm_stats_chosen_under_another_id_are_said_only_once_a_format_uses_them(tmp_path, caplog):
    """The config's asset_id has no stats, the assets' only ones are taken: said as the LeRobot plan reads them, so a
    refusal of the model before that (pi0-FAST) is one error line with no warning in front of it."""
    (tmp_path / "assets" / "robot").mkdir(parents=True)
    shutil.copy(NORM_STATS, tmp_path / "assets" / "robot" / "norm_stats.json")
    options = ExportOptions(precision="bfloat16", action_horizon=10)
    for tree_name, refused in (("pi0_fast", True), ("pi05", False)):
        params = json.loads((TREES / f"{tree_name}.json").read_text())["params"]
        tree = {p: ShapeDtype(tuple(v["shape"]), v["dtype"]) for p, v in params.items()}
        facts = dataclasses.replace(model_facts.resolve(tree, {}, None, config=None, options=options), asset_id="fake")
        caplog.clear()
        facts = model_facts.with_norm_stats(facts, tmp_path / "assets", options)
        assert facts.norm_stats == tmp_path / "assets" / "robot" / "norm_stats.json"
        if refused:
            with pytest.raises(MergeError, match="pi0-FAST is not exported for LeRobot"):
                lerobot_export.plan_lerobot(tree, facts, options, what="t")
            assert caplog.records == []
        else:
            lerobot_export.plan_lerobot(tree, facts, options, what="t")
            [record] = caplog.records
            assert record.getMessage() == (
                f"the config's asset_id 'fake' has no norm stats in {tmp_path / 'assets'}; taking the only ones there, "
                "robot"
            )


def test_full_size_pi05_plan(tmp_path):
    plan = _plan("pi05", tmp_path)
    assert isinstance(plan.layout, lerobot_layout.LeRobotLayout)
    assert (plan.spec.tokenizer_max_length, plan.spec.max_dim) == (200, 32)
    config = json.loads(lerobot_files.config_json(plan.spec))
    assert (config["type"], config["dtype"], config["chunk_size"]) == ("pi05", "bfloat16", 10)


def test_cli_export_lerobot_with_renamed_cameras_and_refusals(merged, capsys):
    argv = ["export", str(merged), "--format", "lerobot", "--action-horizon", "50", "--no-progress"]
    argv += ["--allow-nonstandard-dims", "--camera", "base_0_rgb=observation.images.top", "--n-action-steps", "5"]
    assert cli.main(argv) == 0
    out = merged.parent / "merged_lerobot"
    assert f"--policy.path={out}" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert list(config["input_features"])[:3] == [
        "observation.images.top",
        "observation.images.left_wrist_0_rgb",
        "observation.images.right_wrist_0_rgb",
    ]
    assert config["n_action_steps"] == 5
    pre = json.loads((out / "policy_preprocessor.json").read_text())
    assert "observation.images.top" in pre["steps"][-1]["config"]["features"]
    assert cli.main(argv) == 1  # exists: refused, not replaced
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    for bad, says in (
        (["--camera", "top=observation.images.top"], "unknown camera"),
        (["--camera", "base_0_rgb"], "as OPENPI_NAME=FEATURE"),
        (["--n-action-steps", "51"], "must be 1..the action horizon 50"),
    ):
        assert cli.main([*argv, "--overwrite", *bad]) == 1
        assert says in capsys.readouterr().err, bad
    pytorch = ["export", str(merged), "--action-horizon", "50", "--camera", "base_0_rgb=observation.images.top"]
    assert cli.main(pytorch) == 1
    assert "--camera is for --format lerobot" in capsys.readouterr().err
    assert cli.main([*pytorch[:4], "--model-dtype", "float32", "--format", "lerobot", "--max-token-len", "9"]) == 1
    assert "--model-dtype is for --format pytorch" in capsys.readouterr().err


def test_outputs_inside_the_step_other_than_merged_lerobot_are_refused(step_dir, capsys):
    base = ["export", str(step_dir), "--format", "lerobot", "--action-horizon", "50", "--no-progress"]
    base += ["--lora-config", str(FIXTURE_LORA_CONFIG), "--allow-nonstandard-dims"]
    before = sorted(p.relative_to(step_dir) for p in step_dir.rglob("*"))
    for inside in (step_dir / "params" / "x", step_dir / "elsewhere", step_dir):
        assert cli.main([*base, "--output", str(inside)]) == 1, inside
        assert "error:" in capsys.readouterr().err
    assert sorted(p.relative_to(step_dir) for p in step_dir.rglob("*")) == before
    assert cli.main([*base, "--output", str(step_dir / "merged_lerobot")]) == 0


def test_merge_on_save_exports_for_lerobot_beside_the_merge(tmp_path, fixture_params, fixture_lora, monkeypatch):
    monkeypatch.setattr(openpi_configs, "lora_from_model", lambda model, config_name=None: fixture_lora)
    written = []
    real = export.write_beside_merge

    def write(directory, merged_dir, to, train_config, options, output_path, **kw):
        written.append(output_path)  # the fixture's dims are not LeRobot's: written as --allow-nonstandard-dims does
        options = dataclasses.replace(options, allow_nonstandard_dims=True)
        return real(directory, merged_dir, to, train_config, options, output_path, **kw)

    def create(*args):
        raise AssertionError("the data config was built (its transforms download the tokenizer)")

    monkeypatch.setattr(export, "write_beside_merge", write)
    model = types.SimpleNamespace(
        paligemma_variant="fx_lora_a", action_expert_variant="fx_lora_b", action_horizon=10, max_token_len=64
    )
    model.dtype, model.pi05 = "bfloat16", False
    data = types.SimpleNamespace(assets=types.SimpleNamespace(asset_id=None), repo_id="robot", create=create)
    config = types.SimpleNamespace(
        name="fixture", model=model, data=data, merge_lora=MergeOnSaveOptions(export_lerobot=True)
    )
    step = tmp_path / "5"
    norm = NORM_STATS.read_text()

    def save_assets(assets):  # as openpi's callback writes the run's norm stats into the merge's assets/
        (assets / "robot").mkdir(parents=True)
        (assets / "robot" / "norm_stats.json").write_text(norm)

    request = merged_item.MergeRequest(sources.unflatten(dict(fixture_params)), save_assets, config, 5, step)
    staging = merged_item.write_staged(request)
    assert request.outcome.error is None, request.outcome.error
    merged_item.move_into(staging, step / "merged")
    assert written == [step / "merged_lerobot"]
    out = step / "merged_lerobot"
    assert not (out / _output.FAILURE_MARKER).exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["source"]["merged"] == str(step / "merged")
    assert manifest["source"]["norm_stats"] == "assets/robot/norm_stats.json"
    assert (step / "merged" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5"]  # nothing staged left
    lerobot_config = json.loads((out / "config.json").read_text())  # the run's own config: horizon, token length
    assert (lerobot_config["chunk_size"], lerobot_config["tokenizer_max_length"]) == (10, 64)
    assert manifest["model_facts"] == {"model": "openpi config fixture"}


def test_pi0_fast_export_end_to_end_from_a_paligemma_only_merge(merged, tmp_path, monkeypatch):
    """A pi0-FAST-shaped merged checkpoint (the fixture's PaliGemma alone, as openpi's Pi0FAST tree is pi0's
    PaliGemma; tests/data/openpi-15a9616/trees/pi0_fast.json): LeRobot's PaliGemma tensors only, quantile stats."""
    monkeypatch.setattr(lerobot_export, "PI0_FAST_REFUSED", None)  # past the switch (refused as shipped)
    source = sources.OrbaxSource(merged / "params")
    pi0 = source.read(source.tree)
    second = {p for p in pi0 if p.startswith("PaliGemma/llm/") and any(k.endswith("_1") for k in p.split("/"))}
    fast = {p: a for p, a in pi0.items() if p.startswith("PaliGemma/") and p not in second}
    fast_dir = write_step(tmp_path / "fast" / "merged", dict(fast))
    shutil.copy(merged / "manifest.json", fast_dir / "manifest.json")
    # pi0-FAST's action_dim is not in its params: without a config, the norm stats' (7) is LeRobot's action dim.
    options = ExportOptions(action_horizon=10, max_token_len=180, norm_stats=NORM_STATS, allow_nonstandard_dims=True)
    result = export.export(fast_dir, "lerobot", options=options)
    tensors = load_file(result.output / "model.safetensors")
    assert all(n.startswith("model.paligemma_with_expert.paligemma.") for n in tensors)
    assert len(tensors) == result.manifest["tensors"]
    lm_head = tensors["model." + pytorch_layout.LM_HEAD]
    np.testing.assert_array_equal(lm_head, fast["PaliGemma/llm/embedder/input_embedding"].astype(np.float32))
    config = json.loads((result.output / "config.json").read_text())
    saved = json.loads((REPO / "tests/data/lerobot-0.6.1/saved/pi0_fast/config.json").read_text())
    assert list(config) == list(saved)
    assert (config["type"], config["chunk_size"], config["tokenizer_max_length"]) == ("pi0_fast", 10, 180)
    assert (config["max_action_dim"], config["output_features"]["action"]["shape"]) == (7, [7])
    assert config["normalization_mapping"]["STATE"] == "QUANTILES"
    assert sorted(load_file(result.output / "policy_preprocessor_step_3_normalizer_processor.safetensors")) == sorted(
        f"{f}.{s}" for f in ("observation.state", "action") for s in ("mean", "std", "q01", "q99")
    )
