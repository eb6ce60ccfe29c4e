"""`openpi-merge-lora verify`: merged checkpoints of the real fixture re-checked, intact and damaged."""

import json
import pathlib
import shutil

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
import pytest

from openpi_merge_plugin import MergeError
from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import cli
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin import verify_merged
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checks import integrity
from openpi_merge_plugin.lora import config_schema
from openpi_merge_plugin.lora import configs as lora_configs

ATTN = [
    f"PaliGemma/llm/layers/attn/{m}/w"
    for m in ("attn_vec_einsum", "attn_vec_einsum_1", "kv_einsum", "kv_einsum_1", "q_einsum", "q_einsum_1")
]
MLP = [f"PaliGemma/llm/layers/{m}/{w}" for m in ("mlp", "mlp_1") for w in ("gating_einsum", "linear")]
NORM_STATS = "assets/fixture_robot/norm_stats.json"


@pytest.fixture(scope="module")
def merges(tmp_path_factory) -> dict[str, pathlib.Path]:
    """The fixture step merged three ways: float32 (into <step>/merged), bfloat16, and float32 at strength 0.5."""
    step = tmp_path_factory.mktemp("verify") / "2"
    shutil.copytree(FIXTURE_STEP, step)
    lora = lora_configs.from_file(FIXTURE_LORA_CONFIG)
    return {
        "step": step,
        "float32": merge_checkpoint(step, lora=lora).output,
        "bfloat16": merge_checkpoint(
            step, output=step.parent / "bf16", lora=lora, options=MergeOptions(output_dtype="bfloat16")
        ).output,
        "half": merge_checkpoint(
            step, output=step.parent / "half", lora=lora, options=MergeOptions(strength=0.5)
        ).output,
    }


@pytest.fixture
def merged(merges, tmp_path) -> pathlib.Path:
    """A private copy of the float32 merge; its manifest still names the (existing) LoRA step."""
    dst = tmp_path / "merged"
    shutil.copytree(merges["float32"], dst)
    return dst


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["verify", *map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _statuses(result: integrity.VerifyResult) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}


def _rewrite_manifest(root: pathlib.Path, **changes) -> None:
    """Rewrites the manifest as the merge would (checksums of what is there now), with `changes` applied."""
    manifest = json.loads((root / _output.MANIFEST).read_text())
    manifest.pop("files")
    _output.write_manifest(root, {**manifest, **changes})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_fresh_merge_checks_out_with_and_without_its_lora_step(merges, capsys, dtype):
    out = merges[dtype]
    result = verify_merged(out)
    assert _statuses(result) == {"manifest": "ok", "files": "ok", "structure": "ok", "equivalence": "ok"}
    assert result.ok
    assert result.problems == []
    assert result.lora_step == merges["step"]  # the step the manifest records
    assert result.lora_config == f"recorded in the manifest (file {FIXTURE_LORA_CONFIG})"
    assert sorted(w.path for w in result.weights) == sorted(ATTN + MLP)
    assert all(len(w.rel_err) == 3 and w.ok for w in result.weights)
    worst = max(e for w in result.weights for e in w.rel_err)
    if dtype == "float32":
        assert worst < 1e-5
        assert all(a == pytest.approx(1e-4) for w in result.weights for a in w.allowed)
    else:  # the bf16 rounding of the merged weight is allowed for, and it is far above the float32 tolerance
        assert 1e-4 < worst < 5e-3

    code, out_text, err = _cli(capsys, out)
    assert (code, err) == (0, "")
    assert f"ok: {out} checks out" in out_text
    assert f"LoRA step: {merges['step']}" in out_text

    code, out_text, _ = _cli(capsys, out, "--no-lora")
    assert code == 0
    assert "not requested (--no-lora)" in out_text

    code, out_text, _ = _cli(capsys, out, "--lora-step", merges["step"], "--lora-config", FIXTURE_LORA_CONFIG, "--json")
    printed = json.loads(out_text)
    assert code == 0
    assert printed["ok"] is True
    assert [c["status"] for c in printed["checks"]] == ["ok", "ok", "ok", "ok"]
    assert printed["lora_config"] == f"file {FIXTURE_LORA_CONFIG}"


def _flip_a_byte(root: pathlib.Path) -> str:
    data = max((root / "params" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return f"changed file {data.relative_to(root).as_posix()}: its sha256 differs from the manifest"


def _delete(root: pathlib.Path) -> str:
    (root / NORM_STATS).unlink()
    return f"missing file {NORM_STATS}"


def _add(root: pathlib.Path) -> str:
    (root / "params" / "stray.bin").write_bytes(b"x")
    return "extra file params/stray.bin: not listed in the manifest"


def _append(root: pathlib.Path) -> str:
    size = (root / NORM_STATS).stat().st_size
    with open(root / NORM_STATS, "a") as f:
        f.write(" ")
    return f"changed file {NORM_STATS}: {size + 1} bytes, the manifest says {size}"


@pytest.mark.parametrize("damage", [_flip_a_byte, _delete, _add, _append])
def test_a_damaged_file_is_named(merged, capsys, damage):
    problem = damage(merged)
    result = verify_merged(merged, equivalence=False)
    files = result.checks[1]
    assert (files.name, files.status, files.problems) == ("files", "failed", [problem])
    assert not result.ok
    code, out, _ = _cli(capsys, merged, "--no-lora")
    assert code == 1
    assert f"  - {problem}\n" in out
    assert f"FAILED: 1 problem in {merged}" in out  # one damage, one problem (not "1 problems")


def test_a_merge_replaced_while_it_is_verified_is_not_judged(merged, capsys, monkeypatch):
    """Another command's --overwrite swaps the directory in the middle of verify: verify says so, instead of
    reporting files of two different outputs as "truncated or corrupted" or as problems of either."""
    check_structure = integrity._check_structure  # noqa: SLF001

    def replaced_meanwhile(merged_dir, manifest):
        shutil.move(merged_dir, merged_dir.parent / ".old")
        shutil.copytree(merged_dir.parent / ".old", merged_dir)
        _rewrite_manifest(merged_dir, created_utc="later")
        shutil.rmtree(merged_dir.parent / ".old")
        return check_structure(merged_dir, manifest)

    monkeypatch.setattr(integrity, "_check_structure", replaced_meanwhile)
    code, _, err = _cli(capsys, merged)
    assert code == 1
    assert err == (
        f"error: {merged} was replaced or changed while it was being verified (another command's --overwrite?): "
        "verify it again\n"
    )


def test_a_merge_without_manifest_is_incomplete(merged, capsys):
    (merged / _output.MANIFEST).unlink()
    code, _, err = _cli(capsys, merged)
    assert code == 1
    assert err == (
        f"error: {merged} has params/ but no manifest.json: an incomplete merge or copy (the merge writes "
        "manifest.json last), or not written by openpi-merge-lora\n"
    )


def test_a_truncated_manifest_is_an_error(merged, capsys):
    text = (merged / _output.MANIFEST).read_text()
    (merged / _output.MANIFEST).write_text(text[: len(text) // 2])
    code, _, err = _cli(capsys, merged)
    assert code == 1
    assert err.startswith(f"error: {merged / 'manifest.json'} is not valid JSON (")
    assert err.endswith("): truncated or edited\n")


def test_an_edited_manifest_is_an_error(merged, capsys):
    manifest = json.loads((merged / _output.MANIFEST).read_text())
    (merged / _output.MANIFEST).write_text(json.dumps({**manifest, "weights": [{"path": "x"}]}))
    message = f"error: {merged / 'manifest.json'} has malformed 'files' or 'weights' entries: not written by "
    assert _cli(capsys, merged) == (1, "", message + "openpi-merge-lora\n")
    (merged / _output.MANIFEST).write_text(json.dumps({**manifest, "format_version": 2}))
    assert _cli(capsys, merged) == (
        1,
        "",
        f"error: {merged / 'manifest.json'} has manifest format 2, this version reads format 1\n",
    )


def _drop_recorded_alpha(config):
    del config["experts"]["1"]["attn"]["alpha"]


def _contradict_recorded_scale(config):
    config["experts"]["0"]["attn"]["scaling_value"] = 0.25


def _record_a_third_expert(config):
    config["experts"]["2"] = config["experts"]["1"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_recorded_alpha, "recorded LoRA config is malformed: experts.1.attn has no 'alpha'"),
        (
            _contradict_recorded_scale,
            "recorded LoRA config is malformed: experts.0.attn.scaling_value 0.25 contradicts",
        ),
        (_record_a_third_expert, "the LoRA config the manifest records gives 3 experts, the checkpoint has 2"),
    ],
)
def test_a_recorded_lora_config_that_is_not_as_written_is_refused(merged, capsys, edit, message):
    """The manifest's LoRA config is read as strictly as a file: an edit is an error, never a default."""
    manifest = json.loads((merged / _output.MANIFEST).read_text())
    edit(manifest["lora_config"])
    (merged / _output.MANIFEST).write_text(json.dumps(manifest))
    code, _, err = _cli(capsys, merged)
    assert code == 1
    assert err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1


def test_inputs_that_are_not_merged_checkpoints(merges, tmp_path, capsys):
    step = merges["step"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "nope": f"error: merged checkpoint {tmp_path / 'nope'} does not exist\n",
        tmp_path / "file": f"error: {tmp_path / 'file'} is a file, not a merged checkpoint directory\n",
        tmp_path / "empty": f"error: {tmp_path / 'empty'} is not a merged checkpoint: it has no manifest.json and no "
        "params/\n",
        step: f"error: {step} is an openpi training step, not a merged checkpoint; its merged checkpoint is "
        f"{step / 'merged'}\n",
    }
    for path, message in cases.items():
        assert _cli(capsys, path) == (1, "", message)
    assert _cli(capsys, merges["float32"], "--lora-step", step, "--no-lora") == (
        1,
        "",
        "error: a LoRA step was given but the equivalence check was turned off (--no-lora)\n",
    )
    assert _cli(capsys, merges["float32"], "--lora-step", tmp_path / "nope")[2] == (
        f"error: checkpoint {tmp_path / 'nope'} does not exist\n"
    )


def test_consistently_tampered_weights_fail_only_the_equivalence_check(merges, merged, capsys):
    # Params of the strength-0.5 merge under the strength-1.0 manifest, checksums rewritten to match:
    # files and structure cannot tell, the layer outputs can.
    shutil.rmtree(merged / "params")
    shutil.copytree(merges["half"] / "params", merged / "params")
    _rewrite_manifest(merged)
    assert verify_merged(merged, equivalence=False).ok

    result = verify_merged(merged)
    assert _statuses(result) == {"manifest": "ok", "files": "ok", "structure": "ok", "equivalence": "failed"}
    assert len(result.problems) == 10
    for path, problem in zip(sorted(ATTN + MLP), result.problems, strict=True):
        assert problem.startswith(f"merged weight {path} (layer ")
        assert " does not reproduce the LoRA forward in layers [0, 1, 2]: max relative error " in problem
        assert problem.endswith(" > allowed 1.000e-04")
    assert min(e for w in result.weights for e in w.rel_err) > 1e-3

    code, out, _ = _cli(capsys, merged)
    assert code == 1
    assert f"  - {result.problems[0]}\n" in out


def test_bfloat16_weights_checked_against_another_lora_config_fail(merges, capsys):
    # --alpha 4 changes the attention scale of both experts (openpi never scales the MLP LoRA): the bf16 rounding
    # allowance does not hide a wrong scale.
    result = verify_merged(merges["bfloat16"], lora=integrity.checkpoint_merge.LoRASource(alpha=4.0))
    assert [w.path for w in result.weights if not w.ok] == ATTN
    assert result.lora_config == "options (alpha=4.0, rslora=False)"
    code, out, _ = _cli(capsys, merges["bfloat16"], "--alpha", "4")
    assert code == 1
    assert "FAILED: 6 problems" in out


def test_structure_is_checked_against_the_manifest(merged, merges):
    manifest = json.loads((merged / _output.MANIFEST).read_text())
    weights = manifest["weights"]
    weights[0] = {**weights[0], "output_dtype": "bfloat16"}
    _rewrite_manifest(merged, weights=weights)
    structure = verify_merged(merged, equivalence=False).checks[2]
    assert structure.problems == [
        f"merged weight {ATTN[0]} is [3, 4, 16, 64] float32, the manifest says [3, 4, 16, 64] bfloat16"
    ]

    # The LoRA step's own params in place of the merged ones: adapters are still there.
    shutil.rmtree(merged / "params")
    shutil.copytree(merges["step"] / "params", merged / "params")
    _rewrite_manifest(merged)
    problems = verify_merged(merged, equivalence=False).checks[2].problems
    assert problems[0].startswith("LoRA leaves left in the merged params: PaliGemma/llm/layers/attn/")
    assert problems[-1] == "the params hold 70 leaves, the manifest says 50 (10 merged + 40 passed through)"


def test_the_lora_step_is_found_after_moving_step_and_merge_together(merges, tmp_path):
    step = tmp_path / "moved" / "2"
    shutil.copytree(merges["step"], step)  # holds merged/
    gone = tmp_path / "gone" / "2"
    manifest = json.loads((step / "merged" / _output.MANIFEST).read_text())
    source = {**manifest["source"], "step_dir": str(gone)}
    _rewrite_manifest(step / "merged", source=source, output=str(gone / "merged"))
    result = verify_merged(step / "merged")
    assert result.ok
    assert result.lora_step == step

    _rewrite_manifest(step / "merged", output=str(tmp_path / "elsewhere"))
    result = verify_merged(step / "merged")
    assert result.ok
    assert result.checks[3].status == "skipped"
    assert result.checks[3].detail == f"the LoRA step the manifest records ({gone}) no longer exists; pass --lora-step"


def test_progress_counts_every_byte_and_layer_slice(merges):
    done: dict[str, list[int]] = {}
    totals: dict[str, set[int]] = {}

    def progress(stage: str, n: int, total: int) -> None:
        done.setdefault(stage, []).append(n)
        totals.setdefault(stage, set()).add(total)

    assert verify_merged(merges["float32"], progress=progress).ok
    manifest = json.loads((merges["float32"] / _output.MANIFEST).read_text())
    nbytes = sum(f["bytes"] for f in manifest["files"].values())
    assert (sum(done["hashing"]), totals["hashing"]) == (nbytes, {nbytes})
    assert (sum(done["checking"]), totals["checking"]) == (30, {30})


def test_recorded_lora_config_reads_back(fixture_lora):
    back = config_schema.read_recorded(fixture_lora.to_json())
    assert back == fixture_lora
    with pytest.raises(MergeError, match="recorded LoRA config is malformed"):
        config_schema.read_recorded({"source": "x", "experts": {"0": {"attn": {"alpha": 1.0}}}})


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    text = capsys.readouterr().out
    for flag in ("--lora-step", "--no-lora", "--lora-config", "--alpha", "--tolerance", "--json", "--no-progress"):
        assert flag in text
