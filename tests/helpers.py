"""Paths and helpers shared by the tests."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from openpi_merge_plugin.checkpoint import params_io
from openpi_merge_plugin.checkpoint import sources

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "data" / "openpi-15a9616" / "lora-tiny"
FIXTURE_STEP = FIXTURE / "checkpoint" / "2"
FIXTURE_LORA_CONFIG = REPO / "configs" / "lora_tiny_fixture.json"
TREES = REPO / "tests" / "data" / "openpi-15a9616" / "trees"


def write_step(step: pathlib.Path, flat: dict) -> pathlib.Path:
    """Writes an openpi-like step directory holding `flat` as its params item (and the fixture's assets)."""
    step.mkdir(parents=True)
    params_io.save_params(step / "params", flat)
    shutil.copytree(FIXTURE_STEP / "assets", step / "assets")
    return step


def tree_digest(root: pathlib.Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def golden_entries() -> list[dict]:
    return json.loads((FIXTURE / "golden_layers.json").read_text())["entries"]


def merge_argv(step: pathlib.Path | str, *flags: str) -> list[str]:
    """The command line of a merge of `step` with the fixture's LoRA config (for `cli.main` or after `-m ...cli`)."""
    return [str(step), "--lora-config", str(FIXTURE_LORA_CONFIG), *flags]


def read_leaves(params_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Every leaf of an Orbax params checkpoint, flat."""
    src = sources.OrbaxSource(params_dir)
    return src.read(src.tree)


def rel_err(got, want) -> float:
    """max|got - want| / max|want|, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def run_python(code: str, *, pythonpath: pathlib.Path | str | None = None, **env: str) -> subprocess.CompletedProcess:
    """`python -c code` in a fresh interpreter (this one's), with `pythonpath` first on the path and `env` added."""
    full = {**os.environ, **env}
    if pythonpath is not None:
        full["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=False)
