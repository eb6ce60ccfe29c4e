"""`export` of every kind of openpi checkpoint to both formats (runs without openpi, torch and LeRobot).

The sources are tiny checkpoints written by openpi's own code (tests/data/openpi-15a9616/*/PROVENANCE.md): a LoRA
step (lora-tiny) and its merge; a full fine-tune's train step, pi0.5, saved by `save_state` with EMA on; a pi0 base
model in openpi's released layout (`<name>/params` + `<name>/assets`); and the `params/` of each. Every tensor of a
plain checkpoint's export is the one upstream's converter slices out of the same params (its own functions, digests
recorded in export-tiny/fixtures.json), but where upstream is wrong: the o_proj of a PaliGemma whose width is not
heads x head_dim. LeRobot's tensors are the same under its names (tests/test_lerobot_layout.py checks those names,
shapes and dtypes against LeRobot's own listings; tests/test_openpi_pytorch_export.py loads these exports strictly
into openpi's PI0Pytorch).
"""

import hashlib
import json
import pathlib
import shutil

from helpers import FIXTURE_LORA_CONFIG
from helpers import REPO
from helpers import tree_digest
import numpy as np
import pytest
from safetensors.numpy import load_file

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.cli import app as cli
from openpi_merge_plugin.formats import tensors
from openpi_merge_plugin.pipeline import checkpoint_merge

EXPORT_TINY = REPO / "tests" / "data" / "openpi-15a9616" / "export-tiny"
FIXTURES = json.loads((EXPORT_TINY / "fixtures.json").read_text())
NORM_STATS = REPO / "tests" / "data" / "lerobot-0.6.1" / "norm_stats.json"
LEROBOT_PREFIX = "model."
# (fixture, path inside it): the checkpoint directory, and its params/ given itself.
PLAIN = {
    "train_step": ("pi05_full_ema", "checkpoint/3"),
    "train_step_params": ("pi05_full_ema", "checkpoint/3/params"),
    "released": ("pi0_base", ""),
    "released_params": ("pi0_base", "params"),
}
KINDS = ["lora_step", "merged", *PLAIN]


@pytest.fixture
def plain(tmp_path) -> pathlib.Path:
    """Private copies of the export-tiny checkpoints."""
    for name in ("pi05_full_ema", "pi0_base"):
        shutil.copytree(EXPORT_TINY / name, tmp_path / name)
    return tmp_path


def _source(kind: str, plain: pathlib.Path, step_dir: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    """The source of a kind, and the flags it needs."""
    if kind == "lora_step":
        return step_dir, ["--lora-config", str(FIXTURE_LORA_CONFIG)]
    if kind == "merged":
        return checkpoint_merge.merge_checkpoint(
            step_dir, lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
        ).output, []
    fixture, inside = PLAIN[kind]
    return plain / fixture / inside, []


def _default_output(kind: str, src: pathlib.Path, to: str) -> pathlib.Path:
    if kind == "lora_step":
        return src / f"merged_{to}"
    if kind == "merged":
        return src.parent / f"merged_{to}"
    return (src.parent if src.name == "params" else src) / to


def _export(src: pathlib.Path, to: str, *flags: str) -> int:
    return cli.main(["export", str(src), "--format", to, "--allow-nonstandard-dims", "--no-progress", *flags])


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


@pytest.mark.parametrize("to", ["pytorch", "lerobot"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_source_kind_exports_to_every_format(kind, to, plain, step_dir, capsys):
    src, flags = _source(kind, plain, step_dir)
    before = tree_digest(src)
    assert _export(src, to, *flags) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    out = _default_output(kind, src, to)
    assert f"to {out}" in printed
    assert {k: v for k, v in tree_digest(src).items() if not k.startswith(out.name + "/")} == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["format"] == to
    assert manifest["source"]["kind"] == {"lora_step": "lora_step", "merged": "merged"}.get(kind, "checkpoint")
    merge = manifest["verification"]["merge"]
    if kind in PLAIN:
        assert merge == {"merged": False, "identity": "no LoRA adapters: the leaves are exported as they are"}
        assert "nothing merged: no LoRA adapters" in printed
        assert manifest["lora_config"] is None
    else:
        assert merge["verified"] is True
    assert manifest["verification"]["file"]["tensors_checked"] == manifest["tensors"]
    # No config: the horizon is openpi's default, and says so.
    assert "action_horizon 50" in printed
    assert manifest["model_facts"]["action_horizon"].startswith("openpi's default")


@pytest.mark.parametrize("to", ["pytorch", "lerobot"])
@pytest.mark.parametrize("fixture", ["pi05_full_ema", "pi0_base"])
def test_a_plain_checkpoints_tensors_are_upstream_converters(fixture, to, plain):
    """float32, nothing rounded (model dtype float32): every tensor bitwise the converter's slicing of the params."""
    record = FIXTURES[fixture]
    src = plain / record["checkpoint"]
    flags = ["--model-dtype", "float32"] if to == "pytorch" else []
    assert _export(src, to, "--output", str(plain / "out"), *flags) == 0
    got = load_file(plain / "out" / "model.safetensors")
    prefix = LEROBOT_PREFIX if to == "lerobot" else ""
    upstream = record["upstream_converter"]
    # upstream's names: embed_tokens is the tied lm_head (save_model keeps lm_head; LeRobot has both)
    names = {n.removeprefix(prefix): n for n in got}
    names[tensors.EMBED_TOKENS] = prefix + tensors.LM_HEAD
    assert set(upstream) <= set(names), sorted(set(upstream) - set(names))
    assert set(names) - set(upstream) == {tensors.LM_HEAD, tensors.EXPERT_LM_HEAD}  # the tie; no JAX source
    assert not np.any(got[prefix + tensors.EXPERT_LM_HEAD])
    ours = {n: [list(got[names[n]].shape), _digest(got[names[n]])] for n in upstream}
    wrong = sorted(n for n in upstream if ours[n] != upstream[n])
    pg = gemma_dims(record, record["model_config"]["paligemma_variant"])
    if pg["width"] == pg["num_heads"] * pg["head_dim"]:
        assert wrong == []
        return
    # width != heads x head_dim: upstream's o_proj bytes are right but its shape is (heads*head_dim, width), which
    # PI0Pytorch's (width, heads*head_dim) parameter refuses (load_state_dict: size mismatch, strict or not); ours
    # is the layer's attn_vec_einsum (heads, head_dim, width) as PI0Pytorch's shape.
    o_proj = sorted(n for n in upstream if "language_model" in n and "o_proj" in n)
    assert wrong == o_proj
    params = sources.OrbaxSource(src / "params")
    path = "PaliGemma/llm/layers/attn/attn_vec_einsum/w"
    attn_vec = params.read([path])[path]
    for name in o_proj:
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert upstream[name] == [[pg["num_heads"] * pg["head_dim"], pg["width"]], ours[name][1]]
        want = attn_vec[layer].transpose(2, 0, 1).reshape(pg["width"], -1)
        np.testing.assert_array_equal(got[names[name]], want)


def gemma_dims(record: dict, variant: str) -> dict:
    return record["model_config"]["variants"][variant]


def test_a_train_step_exports_the_ema_params_save_state_wrote(plain):
    """With EMA on, openpi's `save_state` writes the EMA params as `params/`; `train_state/` keeps the live ones."""
    step = plain / FIXTURES["pi05_full_ema"]["checkpoint"]
    assert _export(step, "pytorch", "--output", str(plain / "out"), "--model-dtype", "float32") == 0
    got = load_file(plain / "out" / "model.safetensors")["action_in_proj.weight"]
    path = "action_in_proj/kernel"
    ema = sources.OrbaxSource(step / "params").read([path])[path]
    live = sources.OrbaxSource(step / "train_state").read([path])[path]
    np.testing.assert_array_equal(got, ema.T)
    assert not np.array_equal(ema, live)


def test_a_base_checkpoint_without_norm_stats_exports_for_pytorch_and_for_lerobot_only_given_them(plain, capsys):
    base = plain / "pi0_base"
    shutil.rmtree(base / "assets")
    assert _export(base, "pytorch") == 0
    assert not (base / "pytorch" / "assets").exists()
    capsys.readouterr()
    assert _export(base, "lerobot") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert f"{base / 'assets'} does not exist: pass --norm-stats FILE" in err
    assert "pass --norm-stats FILE" in err
    assert not (base / "lerobot").exists()
    assert _export(base, "lerobot", "--norm-stats", str(NORM_STATS)) == 0
    manifest = json.loads((base / "lerobot" / "manifest.json").read_text())
    assert manifest["source"]["norm_stats"] == str(NORM_STATS)
    assert manifest["source"]["norm_stats_sha256"] == hashlib.sha256(NORM_STATS.read_bytes()).hexdigest()


def test_what_the_params_cannot_tell_comes_from_the_options(plain):
    step = plain / FIXTURES["pi05_full_ema"]["checkpoint"]
    flags = ["--action-horizon", "10", "--max-token-len", "64", "--n-action-steps", "5", "--device", "cpu"]
    assert _export(step, "lerobot", *flags) == 0
    config = json.loads((step / "lerobot" / "config.json").read_text())
    assert (config["type"], config["chunk_size"], config["n_action_steps"]) == ("pi05", 10, 5)
    assert (config["tokenizer_max_length"], config["max_action_dim"]) == (64, 32)
    assert json.loads((step / "lerobot" / "manifest.json").read_text())["source"]["norm_stats"] == (
        "assets/tiny_robot/norm_stats.json"
    )
    assert _export(step, "pytorch", "--action-horizon", "10") == 0
    pytorch_config = json.loads((step / "pytorch" / "config.json").read_text())
    # Variant names no openpi variant has the dims of: "custom", as for a LoRA config given by --alpha.
    assert pytorch_config == {
        "action_dim": 32,
        "action_horizon": 10,
        "paligemma_variant": "custom",
        "action_expert_variant": "custom",
        "precision": "float32",
    }


def test_refusals_come_before_any_work_with_one_error_line(plain, capsys):
    base = plain / "pi0_base"
    before = tree_digest(base)
    for flags, says in (
        (["--lora-config", str(FIXTURE_LORA_CONFIG)], "has no LoRA adapters: --lora-config/--alpha/--rslora are for"),
        (["--output", str(base / "elsewhere")], "inside"),
        (["--output", str(base / "params" / "x")], "inside"),
        (["--asset-id", "other", "--format", "lerobot"], "no norm stats for asset_id 'other'"),
        (["--format", "pytorch", "--camera", "base_0_rgb=observation.images.top"], "--camera is for --format lerobot"),
    ):
        assert cli.main(["export", str(base), "--allow-nonstandard-dims", "--no-progress", *flags]) == 1, flags
        err = capsys.readouterr().err
        assert err.startswith("error: "), (flags, err)
        assert err.count("\n") == 1, (flags, err)
        assert says in err, (flags, err)
    assert tree_digest(base) == before
    assert _export(base, "pytorch", "--output", str(base / "pytorch")) == 0  # its own name inside it


def test_a_plain_step_takes_its_export_only_in_its_own_slot_for_the_format(plain, capsys):
    """A full fine-tune's step is a checkpoint step: its export goes in `<step>/pytorch` or `<step>/lerobot`, each
    only for its own format and its own step; nothing else inside it or inside another step."""
    run = plain / "pi05_full_ema" / "checkpoint"
    step = run / "3"
    shutil.copytree(step, run / "1")
    before = tree_digest(plain)
    refused = {
        "merged_pytorch": ("pytorch", f"(or {step / 'pytorch'})"),  # a LoRA step's slot, not this step's
        "lerobot": ("pytorch", f"(or {step / 'pytorch'})"),  # the slot of the other format
        "lerobot_peft": ("pytorch", f"(or {step / 'pytorch'})"),  # a LoRA step's adapter slot
        "params/x": ("pytorch", "lies inside"),
        "../1/pytorch": ("pytorch", "is the slot of step"),  # a sibling step's slot
        "../1/notes": ("lerobot", "lies inside"),
    }
    for name, (to, message) in refused.items():
        capsys.readouterr()
        stats = ["--norm-stats", str(NORM_STATS)] if to == "lerobot" else []
        assert _export(step, to, "--output", str(step / name), *stats) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("error: "), err
        assert err.count("\n") == 1, err
        assert message in err, (name, err)
    assert tree_digest(plain) == before
    assert _export(step, "lerobot", "--output", str(step / "lerobot")) == 0
    assert (step / "lerobot" / "manifest.json").is_file()
