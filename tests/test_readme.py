"""The README's commands and Python snippet run as written on the bundled example, without openpi."""

import os
import pathlib
import pydoc
import re
import shlex
import subprocess
import sys

from helpers import REPO

import openpi_merge_plugin

README = (REPO / "README.md").read_text()
EXAMPLE_OUTPUT = "/tmp/openpi-merge-example"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def _example_commands() -> list[list[str]]:
    """Every `openpi-merge-lora ...` command of the README (code blocks and inline code) that runs on the bundled
    example, in README order."""
    blocks = re.sub(
        r"```[a-z]*\n(.*?)```", lambda m: "".join(f"`{x}`" for x in m.group(1).splitlines()), README, flags=re.DOTALL
    )
    commands = []
    for span in re.findall(r"`([^`\n]+)`", blocks):
        code = span.split(" # ")[0]
        if "openpi-merge-lora " not in code or not ("lora-tiny" in code or EXAMPLE_OUTPUT + " " in code + " "):
            continue
        words = shlex.split(code[code.index("openpi-merge-lora ") :])
        commands.append(words[1 : words.index("&&")] if "&&" in words else words[1:])
    return commands


def test_every_subcommand_the_readme_shows_runs_on_the_bundled_example(tmp_path):
    commands = _example_commands()
    subcommands = [c[0] if c[0] in ("verify", "inspect", "export") else "merge" for c in commands]
    assert sorted(set(subcommands)) == ["export", "inspect", "merge", "verify"]
    assert subcommands[0] == "merge"
    for command in commands:
        argv = [
            str(tmp_path / "example") + a[len(EXAMPLE_OUTPUT) :] if a.startswith(EXAMPLE_OUTPUT) else a for a in command
        ]
        argv = [str(tmp_path / "picture.png") if a.endswith(".png") else a for a in argv]
        proc = subprocess.run(
            [sys.executable, "-m", "openpi_merge_plugin.cli", *argv, "--no-progress"],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        assert proc.returncode == 0, f"{shlex.join(argv)}:\n{proc.stderr}"
        assert "WARNING:absl" not in proc.stderr
    assert (tmp_path / "example" / "manifest.json").is_file()
    assert (tmp_path / "example_pytorch" / "model.safetensors").is_file()
    assert (tmp_path / "example_lerobot" / "policy_preprocessor.json").is_file()
    assert (tmp_path / "picture.png").is_file()
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_the_python_snippet_runs_as_written(tmp_path):
    (snippet,) = re.findall(r"From Python.*?\n```python\n(.*?)```", README, flags=re.DOTALL)
    assert "/tmp/openpi-merge-example-py" in snippet
    code = snippet.replace("/tmp/openpi-merge-example-py", str(tmp_path / "py"))
    code += "\nimport numpy as np\nassert isinstance(merged, dict) and 'PaliGemma' in merged\n"
    code += "assert not [k for k in merged['PaliGemma']['llm']['layers']['attn']['q_einsum'] if k.startswith('lora')]\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "py" / "manifest.json").is_file()
    # The library logs nothing of its own at WARNING, and none of Orbax's per-read notices.
    assert "WARNING" not in proc.stderr, proc.stderr


def test_help_lists_the_public_api():
    text = pydoc.render_doc(openpi_merge_plugin, renderer=pydoc.plaintext)
    for name in openpi_merge_plugin.__all__:
        assert re.search(rf"\b{name}\b", text), name
        assert getattr(openpi_merge_plugin, name) is not None
    assert set(openpi_merge_plugin.__all__) <= set(dir(openpi_merge_plugin))


def test_the_readme_picture_was_drawn_by_the_command_it_shows():
    # So that the README's inspect command can redraw it (--overwrite replaces a picture only if the command drew it
    # and it is unchanged since: its sha256 as recorded in it).
    from openpi_merge_plugin.cli import plot_mark

    assert plot_mark.drawn_here(pathlib.Path(REPO / "docs" / "inspect_lora_tiny.png").read_bytes())
