import json
import shutil
import subprocess
import sys

from helpers import FIXTURE_STEP
from helpers import REPO
from helpers import merge_argv
from helpers import tree_digest
import pytest

from openpi_merge_plugin.cli import app as cli


def test_cli_merges_prints_a_summary_and_refuses_a_second_run(step_dir, capsys):
    assert cli.main([*merge_argv(step_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "verified: every merged layer matches the LoRA forward" in out
    assert "10 weights merged, 20 LoRA leaves removed, 40 leaves passed through unchanged" in out
    assert f"output: {step_dir / 'merged'}" in out
    assert (step_dir / "merged" / "manifest.json").is_file()
    assert cli.main([*merge_argv(step_dir), "--no-progress"]) == 1
    first = json.loads((step_dir / "merged" / "manifest.json").read_text())
    argv = [*merge_argv(step_dir), "--overwrite", "--json", "--no-progress"]
    argv += ["--output-dtype", "bfloat16"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dtype_policy"]["merged_weights"] == "bfloat16"
    assert printed["files"] != first["files"]
    assert json.loads((step_dir / "merged" / "manifest.json").read_text()) == printed


def _script_help(*argv: str) -> str:
    cmd = [sys.executable, str(REPO / "scripts" / "merge_lora.py"), *argv, "--help"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO).stdout


def test_script_has_the_same_interface():
    overview = _script_help()
    assert "default subcommand: merge" in overview
    for name in cli.SUBCOMMANDS:
        assert f"  {name} " in overview
    proc_stdout = _script_help("merge")
    for flag in ("--config", "--lora-config", "--output", "--output-dtype", "--strength", "--no-verify", "--overwrite"):
        assert flag in proc_stdout


def test_version(capsys):
    from openpi_merge_plugin import __version__

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"openpi-merge-lora {__version__}"


def test_top_level_help_names_both_export_formats(capsys):
    assert cli.main(["--help"]) == 0
    export_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("export"))
    assert "PyTorch" in export_line
    assert "LeRobot" in export_line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merg", "run/2"], "unknown subcommand 'merg' (and no such path): did you mean 'merge'?"),
        (["veryfy", "run/2/merged"], "unknown subcommand 'veryfy' (and no such path): did you mean 'verify'?"),
        (["exprot", "run/2"], "unknown subcommand 'exprot' (and no such path): did you mean 'export'?"),
        (["frobnicate", "run/2"], "unknown subcommand 'frobnicate' (and no such path): subcommands are merge, "),
    ],
)
def test_a_misspelt_subcommand_says_so(tmp_path, monkeypatch, capsys, argv, message):
    shutil.copytree(FIXTURE_STEP, tmp_path / "run" / "2")
    monkeypatch.chdir(tmp_path)
    before = tree_digest(tmp_path)
    assert cli.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {message}"), err
    assert tree_digest(tmp_path) == before


def test_a_step_named_like_a_subcommand_typo_is_still_merged(tmp_path, monkeypatch, capsys):
    shutil.copytree(FIXTURE_STEP, tmp_path / "merg")
    monkeypatch.chdir(tmp_path)
    assert cli.main(merge_argv("merg", "--no-progress")) == 0
    assert (tmp_path / "merg" / "merged" / "manifest.json").is_file()


def test_every_error_is_one_bounded_line(monkeypatch, capsys):
    from openpi_merge_plugin.cli import merge as merge_cli
    from openpi_merge_plugin.errors import MergeError

    def fail(args):
        raise MergeError("cannot copy\n" + "a/very/long/path/" * 90_000 + "\nFile name too long")

    monkeypatch.setattr(merge_cli, "run", fail)
    assert cli.main(["somewhere", "--no-progress"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: cannot copy a/very/long/path/")
    assert err[0].endswith("File name too long")
    assert len(err[0]) <= cli.MAX_MESSAGE_CHARS + 100
