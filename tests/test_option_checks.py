"""Every option of every subcommand, and of merge on save, is checked before any work starts.

The walk below covers each field of each subcommand's `Args` and of `MergeOnSaveOptions`: a field must have
out-of-range values here (each must fail with one `error:` line naming the flag, nothing written), or be a switch
(a bool, which has none). An option added without a check, or without a row here, fails this test.
"""

import dataclasses
import importlib
import json
import math
import pathlib
import shutil
import typing

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import merge_argv
from helpers import tree_digest
from helpers import write_step
import pytest
import tyro

from openpi_merge_plugin import cli
from openpi_merge_plugin import options
from openpi_merge_plugin.cli import app
from openpi_merge_plugin.errors import ConfigError
from openpi_merge_plugin.lora import configs as lora_configs
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions

# field -> [(argv fragment, text the error line must contain)]; "{flag}" is the field's flag.
NUMBERS = {
    "alpha": [(v, "{flag} must be a finite number > 0") for v in ("-1", "0", "nan", "inf", "-inf")],
    "strength": [(v, "{flag} must be a finite number") for v in ("nan", "inf", "-inf")],
    "tolerance": [(v, "{flag} must be a finite number > 0") for v in ("0", "-1e-4", "nan", "inf")],
    "action_horizon": [(v, "{flag} must be an integer in 1..8192") for v in ("0", "-50", str(10**12))],
}
BAD = {
    **{name: [([f"--{name.replace('_', '-')}", v], m) for v, m in values] for name, values in NUMBERS.items()},
    "config": [(["--config", ""], "{flag} must be a non-empty string")],
    "lora_config": [
        (["--lora-config", "nope.json"], "{flag} nope.json does not exist"),
        (["--lora-config", "."], "{flag} . is not a file"),
    ],
    "output_dtype": [(["--output-dtype", "float16"], "invalid choice 'float16' for argument '{flag}'")],
    "precision": [(["--precision", "fp8"], "invalid choice 'fp8' for argument '{flag}'")],
    "model_dtype": [(["--model-dtype", "int8"], "invalid choice 'int8' for argument '{flag}'")],
    "format": [(["--format", "onnx"], "invalid choice 'onnx' for argument '{flag}'")],
    "output": [(["--output", "some_file", "--overwrite"], "{flag} {cwd}/some_file is a file")],
    "plot": [(["--plot", "picture.txt"], "{flag} must end in .png, .pdf, .svg")],
    "lora_step": [(["--lora-step", "nope"], "checkpoint {cwd}/nope does not exist")],
    "seed": [
        (["--seed", "1.5"], "Error parsing --seed"),
        (["--seed", str(2**70)], f"--seed must be an integer in 0..{2**63 - 1}"),
        (["--seed", "-1"], f"--seed must be an integer in 0..{2**63 - 1}"),
    ],
    "camera": [
        (["--format", "lerobot", "--camera", "base_0_rgb"], "--camera 'base_0_rgb': give each camera once"),
        (["--format", "lerobot", "--camera", "top=observation.images.top"], "--camera: unknown camera ['top']"),
        (["--camera", "base_0_rgb=observation.images.top"], "--camera is for --format lerobot"),
    ],
    "asset_id": [(["--format", "lerobot", "--asset-id", ""], "{flag} must be a non-empty string")],
    "norm_stats": [(["--format", "lerobot", "--norm-stats", "nope.json"], "{flag} nope.json does not exist")],
    "n_action_steps": [(["--format", "lerobot", "--n-action-steps", "0"], "{flag} must be a positive integer")],
    "max_token_len": [
        (["--format", "lerobot", "--max-token-len", v], "{flag} must be an integer in 1..8192")
        for v in ("-1", str(10**9))
    ],
    "device": [
        (["--format", "lerobot", "--device", v], "{flag} must be a torch device such as cuda") for v in ("", "banana")
    ],
    "base": [
        (["--format", "lerobot-peft", "--base", ""], "{flag} must be a non-empty string"),
        (["--format", "lerobot", "--base", "lerobot/pi0_base"], "{flag} is for --format lerobot-peft"),
        (["--base", "lerobot/pi0_base"], "{flag} is for --format lerobot-peft"),  # the default format, pytorch
    ],
    "base_revision": [
        (["--format", "lerobot-peft", "--base-revision", ""], "{flag} must be a non-empty string"),
        (["--format", "lerobot", "--base-revision", "main"], "{flag} is for --format lerobot-peft"),
    ],
}
# Positional sources: a path that is not there.
POSITIONAL = {"step_dir", "merged_dir", "path", "src"}
# Switches with a check across options: the flag alone is wrong.
ALONE = {"rslora": "--rslora needs --alpha"}
# A valid source for each subcommand; the bad option is added to it.
SOURCE = {"merge": "run/2", "verify": "run/2/merged", "inspect": "run/2", "export": "run/2/merged"}


SWITCHES: set[tuple[str, str]] = set()  # (subcommand, field): bools, which have no out-of-range values


def _options(args_type: type) -> list[tuple[str, type]]:
    """(name, type) of every option of a subcommand; nested options (the LoRA source, the merge options, whose flags
    tyro writes without a prefix) are walked into."""
    found = []
    hints = typing.get_type_hints(args_type)
    for field in dataclasses.fields(args_type):
        if dataclasses.is_dataclass(hints[field.name]):
            found += _options(hints[field.name])
        else:
            found.append((field.name, hints[field.name]))
    return found


def _cases():
    for name, (module_name, _) in app.SUBCOMMANDS.items():
        for field, hint in _options(importlib.import_module(module_name).Args):
            flag = f"--{field.replace('_', '-')}"
            if field in POSITIONAL:
                yield name, field, ["nope"], "nope does not exist"
            elif field in BAD:
                for argv, message in BAD[field]:
                    yield name, field, argv, message.replace("{flag}", flag)
            elif hint is bool:
                SWITCHES.add((name, field))
                if field in ALONE:
                    yield name, field, [flag], ALONE[field]
            else:
                yield name, field, None, f"{name} {flag} has no out-of-range values in this test"


CASES = list(_cases())


@pytest.fixture
def world(tmp_path, monkeypatch) -> pathlib.Path:
    step = tmp_path / "run" / "2"
    shutil.copytree(FIXTURE_STEP, step)
    assert cli.main([*merge_argv(step), "--no-progress"]) == 0
    (tmp_path / "some_file").write_text("keep me\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("sub", "field", "argv", "message"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_an_out_of_range_option_fails_before_any_work(world, capsys, sub, field, argv, message):
    assert argv is not None, message  # a new option: give it a check and a row above
    capsys.readouterr()
    before = tree_digest(world)
    source = [] if field in POSITIONAL else [SOURCE[sub]]
    code = cli.main([sub, *source, *argv, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2), err
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    assert message.replace("{cwd}", str(world)) in err[0]
    assert tree_digest(world) == before


def test_every_option_of_every_subcommand_is_walked():
    walked = {(sub, field) for sub, field, *_ in CASES} | SWITCHES
    for name, (module_name, _) in app.SUBCOMMANDS.items():
        fields = {f for f, _ in _options(importlib.import_module(module_name).Args)}
        assert {f for s, f in walked if s == name} == fields


def _merge_on_save_bad_values():
    hints = typing.get_type_hints(MergeOnSaveOptions)
    for field in dataclasses.fields(MergeOnSaveOptions):
        hint = hints[field.name]
        if hint is bool:
            continue
        if typing.Literal in (typing.get_origin(hint), *map(typing.get_origin, typing.get_args(hint))):
            yield field.name, "no-such-value"  # a Literal, or an optional one
        elif field.name in ("export_base", "export_base_revision"):
            yield field.name, ""
        elif field.name == "host_buffer_mib":
            yield from ((field.name, v) for v in (-1, 1.5))
        elif field.name in NUMBERS:
            yield from ((field.name, v) for v in (math.nan, math.inf, -1.0 if field.name == "tolerance" else math.nan))
        else:
            yield field.name, None  # a new option: give it a check and a bad value here


@pytest.mark.parametrize(("field", "value"), list(_merge_on_save_bad_values()))
def test_merge_on_save_options_fail_when_the_config_is_built(field, value):
    assert value is not None, f"MergeOnSaveOptions.{field} has no out-of-range value in this test"
    with pytest.raises(options.OptionError) as raised:
        MergeOnSaveOptions(**{field: value})
    assert raised.value.option == f"merge_lora.{field}"
    flag = f"--merge-lora.{field.replace('_', '-')}"
    assert raised.value.as_flag().startswith(f"{flag} must be")


def test_the_peft_adapter_on_save_needs_its_base():
    with pytest.raises(options.OptionError) as raised:
        MergeOnSaveOptions(export_lerobot_peft=True)
    assert raised.value.as_flag() == (
        "--merge-lora.export-base is needed by export_lerobot_peft: the base policy the adapter loads on"
    )
    assert MergeOnSaveOptions(export_lerobot_peft=True, export_base="lerobot/pi0_base").export_base


@pytest.mark.parametrize(("flag", "value"), [("--strength", "nan"), ("--tolerance", "0"), ("--host-buffer-mib", "-1")])
def test_merge_on_save_options_from_the_command_line_fail_as_tyro_builds_them(flag, value):
    # What `scripts/train.py ... --merge-lora.strength nan` does: tyro builds the options, which refuse the value.
    with pytest.raises(options.OptionError, match=f"merge_lora.{flag[2:].replace('-', '_')} must be"):
        tyro.cli(MergeOnSaveOptions, args=[flag, value])


def test_every_merge_on_save_option_has_a_check():
    for field in dataclasses.fields(MergeOnSaveOptions):
        hint = typing.get_type_hints(MergeOnSaveOptions)[field.name]
        if hint is not bool:
            assert any(name == field.name for name, _ in _merge_on_save_bad_values())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"alpha": -1}, "experts[0].attn.alpha must be a finite number > 0, got -1.0"),
        ({"alpha": 0}, "experts[0].attn.alpha must be a finite number > 0, got 0.0"),
        ({"rank": 0}, "experts[0].attn.rank must be a positive integer, got 0"),
        ({"rank": 4.5}, "experts[0].attn.rank must be a positive integer, got 4.5"),
        ({"rank": "4"}, "experts[0].attn.rank must be a positive integer, got '4'"),
        ({"rslora": "yes"}, "experts[0].attn.rslora must be true or false, got 'yes'"),
        ({"axes": [-2]}, "experts[0].attn.axes must be two integer axes, got (-2,)"),
        ({"label": ""}, "experts[0].attn.label must be a non-empty string, got ''"),
        (
            {"scale": 2.0},
            "experts[0].attn has unknown key 'scale' (known: rank, alpha, rslora, axes, label, scaling_value)",
        ),
        (
            {"scaling_value": 0.25},
            (
                "experts[0].attn.scaling_value 0.25 contradicts rank 4, alpha 8 and rslora false (alpha / rank = 2): fix one "
                "of them"
            ),
        ),
        (
            {"scaling_value": 2.0, "rslora": True},
            (
                "experts[0].attn.scaling_value 2.0 contradicts rank 4, alpha 8 and rslora true (alpha / sqrt(rank) = 4): fix "
                "one of them"
            ),
        ),
    ],
)
def test_a_lora_config_file_with_a_bad_value_names_it(tmp_path, edit, message):
    data = json.loads(FIXTURE_LORA_CONFIG.read_text())
    data["experts"][0]["attn"].update(edit)
    path = tmp_path / "lora.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as raised:
        lora_configs.from_file(path)
    assert str(raised.value) == f"LoRA config file {path}: {message}"


def _without_alpha(data):
    del data["experts"][0]["attn"]["alpha"]


def _alpha_beside_attn(data):
    data["experts"][0]["alpha"] = data["experts"][0]["attn"].pop("alpha")


def _top_level_typo(data):
    data["expert"] = data.pop("experts")


def _no_ffn_key(data):
    del data["experts"][1]["ffn"]


# A file that parses as JSON but does not say what a LoRA config must: each refused, naming the place.
MALFORMED = {
    "alpha missing": (_without_alpha, "experts[0].attn has no 'alpha' (openpi's LoRAConfig defaults it to 1.0,"),
    "alpha beside attn": (
        _alpha_beside_attn,
        "experts[0] has unknown key 'alpha' (known: variant, attn, ffn); alpha and rank belong inside attn/ffn",
    ),
    "a misspelt top-level key": (_top_level_typo, "the file has unknown key 'expert' (known: experts, config_name, "),
    "a kind left out": (_no_ffn_key, "experts[1] has no 'ffn' (write \"ffn\": null if the expert has no ffn LoRA)"),
    "experts not a list": (lambda d: d.update(experts={"0": d["experts"][0]}), "experts must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_lora_config_file_fails_the_merge_before_any_work(tmp_path, capsys, case):
    edit, message = MALFORMED[case]
    step = tmp_path / "2"
    shutil.copytree(FIXTURE_STEP, step)
    data = json.loads(FIXTURE_LORA_CONFIG.read_text())
    edit(data)
    (tmp_path / "lora.json").write_text(json.dumps(data))
    before = tree_digest(tmp_path)
    assert cli.main([str(step), "--lora-config", str(tmp_path / "lora.json"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: LoRA config file {tmp_path / 'lora.json'}: {message}"), err[0]
    assert tree_digest(tmp_path) == before


def test_a_duplicated_key_is_refused(tmp_path):
    text = FIXTURE_LORA_CONFIG.read_text().replace('"alpha": 8.0,', '"alpha": 8.0, "alpha": 1.0,', 1)
    path = tmp_path / "lora.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="key 'alpha' appears twice in one object"):
        lora_configs.from_file(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["experts"].append(d["experts"][1]),
            "gives 3 experts, the checkpoint has 2 (adapters: expert 0 attn, expert 0 ffn, expert 1 attn, expert 1 ffn)",
        ),
    ],
)
def test_a_lora_config_file_of_another_model_is_refused(tmp_path, capsys, edit, message):
    step = tmp_path / "2"
    shutil.copytree(FIXTURE_STEP, step)
    data = json.loads(FIXTURE_LORA_CONFIG.read_text())
    edit(data)
    (tmp_path / "lora.json").write_text(json.dumps(data))
    before = tree_digest(tmp_path)
    for sub in (["merge"], ["inspect"], ["export", "--action-horizon", "50", "--allow-nonstandard-dims"]):
        argv = [sub[0], str(step), *sub[1:], "--lora-config", str(tmp_path / "lora.json"), "--no-progress"]
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: LoRA config file {tmp_path / 'lora.json'} {message}: a config of another model?"]
    assert tree_digest(tmp_path) == before


def test_a_lora_config_for_an_expert_without_those_adapters_is_refused(tmp_path, fixture_params, capsys):
    flat = {p: v for p, v in fixture_params.items() if not ("mlp_1" in p and "lora" in p)}  # no ffn LoRA on expert 1
    step = write_step(tmp_path / "run" / "2", flat)
    before = tree_digest(tmp_path)
    assert cli.main([*merge_argv(step), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        (
            f"error: LoRA config file {FIXTURE_LORA_CONFIG} gives expert 1 an ffn LoRA config, but the checkpoint has "
            "no ffn adapters on expert 1 (adapters: expert 0 attn, expert 0 ffn, expert 1 attn): a config of another "
            "model?"
        )
    ]
    assert tree_digest(tmp_path) == before


def test_a_bad_alpha_in_the_file_fails_the_merge_before_any_work(tmp_path, capsys):
    step = tmp_path / "2"
    shutil.copytree(FIXTURE_STEP, step)
    data = json.loads(FIXTURE_LORA_CONFIG.read_text())
    data["experts"][1]["ffn"]["alpha"] = -4.0
    (tmp_path / "lora.json").write_text(json.dumps(data))
    before = tree_digest(tmp_path)
    assert cli.main([str(step), "--lora-config", str(tmp_path / "lora.json"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: LoRA config file {tmp_path / 'lora.json'}: experts[1].ffn.alpha must be a finite number > 0, got -4.0"
    ]
    assert tree_digest(tmp_path) == before


def test_an_option_without_a_check_is_a_bug_caught_at_once():
    @dataclasses.dataclass
    class NewOptions:
        checked: int = 1
        forgotten: int = 2

        def __post_init__(self):
            options.validate(self, {"checked": options.positive_int})

    with pytest.raises(TypeError, match=r"NewOptions\.forgotten has no check"):
        NewOptions()
