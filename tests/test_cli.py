import json
import subprocess
import sys

from helpers import REPO
from helpers import merge_argv

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
