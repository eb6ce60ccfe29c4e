"""Paths and helpers shared by the tests."""

import hashlib
import json
import pathlib
import shutil

from openpi_merge_plugin.checkpoint import params_io

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
