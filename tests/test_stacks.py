"""Both ends of the supported dependency range read each other's merged checkpoints, bitwise.

A merged checkpoint must keep openpi's on-disk layout whichever jax / orbax-checkpoint wrote it: one written by the
newest stack is served by openpi 15a9616 (orbax-checkpoint 0.11.13), and one written there is read by the newest.
`OPENPI_MERGE_OTHER_PYTHON` names the interpreter of the other stack (`.ci/run` sets it: the pinned venv and the
latest one, each pointing at the other); without it these tests skip. Each side merges the bundled fixture, and
both interpreters read the result with `stack_reader.py` (openpi's `restore_params` where openpi is importable, the
same Orbax calls otherwise), which must give the same bytes for every leaf.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import REPO
import numpy as np
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin import verify_merged
from openpi_merge_plugin.checkpoint import params_io
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.merge import engine

OTHER = os.environ.get("OPENPI_MERGE_OTHER_PYTHON")
READER = pathlib.Path(__file__).with_name("stack_reader.py")

pytestmark = pytest.mark.skipif(
    not OTHER,
    reason="OPENPI_MERGE_OTHER_PYTHON is not set: no second dependency stack to read and write with "
    "(.ci/run sets it to the other venv's python)",
)


def _run(python: str, *args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([python, *args], env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, f"{python} {' '.join(args)} failed:\n{proc.stderr[-4000:]}"
    return proc.stdout


def _read(python: str, params_dir: pathlib.Path, env: dict[str, str]) -> dict:
    return json.loads(_run(python, str(READER), str(params_dir), env=env))


@pytest.fixture(scope="module")
def other_env(tmp_path_factory) -> dict[str, str]:
    """The other interpreter runs this checkout, with a JAX compilation cache of its own."""
    assert pathlib.Path(OTHER).is_file(), f"OPENPI_MERGE_OTHER_PYTHON={OTHER} does not exist"
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("other-jax-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(scope="module")
def fixture_digests(other_env) -> dict[str, list]:
    """Every leaf of the fixture's LoRA step, as this stack reads it."""
    return _read(sys.executable, FIXTURE_STEP / "params", other_env)["leaves"]


def _check_same_bytes(merged: pathlib.Path, env: dict[str, str], fixture_digests: dict[str, list]) -> dict:
    """Reads `merged/params` here and there; returns this side's digests."""
    here, there = _read(sys.executable, merged / "params", env), _read(OTHER, merged / "params", env)
    print(f"here: {here['reader']} {here['versions']}\nthere: {there['reader']} {there['versions']}")
    assert here["leaves"].keys() == there["leaves"].keys()
    for path, digest in here["leaves"].items():
        assert there["leaves"][path] == digest, f"{path}: {there['leaves'][path]} there, {digest} here"
    # Every LoRA leaf is gone, the adapted weights are float32, and what the merge leaves alone is the LoRA step's
    # own bytes.
    adapted = {w["path"] for w in json.loads((merged / "manifest.json").read_text())["weights"]}
    assert len(adapted) == 10
    assert set(here["leaves"]) == {p for p in fixture_digests if "lora" not in p}
    for path, (dtype, shape, _) in here["leaves"].items():
        if path in adapted:
            assert (dtype, shape) == ("float32", fixture_digests[path][1]), path
        else:
            assert here["leaves"][path] == fixture_digests[path], path
    return here["leaves"]


def test_merged_here_is_read_there_bitwise(tmp_path, fixture_lora, fixture_params, other_env, fixture_digests):
    step = tmp_path / "2"
    shutil.copytree(FIXTURE_STEP, step)
    merged = merge_checkpoint(step, lora=fixture_lora).output
    streamed = _check_same_bytes(merged, other_env, fixture_digests)
    # The other stack's `verify` (its Orbax reading the weights a layer slice at a time) accepts it too.
    _run(OTHER, "-m", "openpi_merge_plugin.cli", "verify", str(merged), "--no-progress", env=other_env)
    # The in-memory path (`merge_params`, then a plain Orbax save) writes the same bytes, also readable there.
    in_memory = engine.merge_params(sources.unflatten(fixture_params), fixture_lora, MergeOptions())
    params_io.save_params(tmp_path / "in-memory" / "params", sources.flatten(in_memory.params))
    assert _read(OTHER, tmp_path / "in-memory" / "params", other_env)["leaves"] == streamed


def test_merged_there_is_read_here_bitwise(tmp_path, fixture_lora, other_env, fixture_digests):
    step = tmp_path / "2"
    shutil.copytree(FIXTURE_STEP, step)
    out = tmp_path / "merged-there"
    # The README's merge command, run by the other stack.
    cli = ["-m", "openpi_merge_plugin.cli", str(step), "--lora-config", str(FIXTURE_LORA_CONFIG)]
    _run(OTHER, *cli, "--output", str(out), "--overwrite", "--no-progress", env=other_env)
    _check_same_bytes(out, other_env, fixture_digests)
    result = verify_merged(out)  # this stack's check of files, structure and every layer against the LoRA forward
    assert result.ok, result.problems
    # Both stacks merge alike: the weights agree with this stack's own merge up to float32 rounding (bitwise where
    # both XLA versions round the same way).
    theirs = sources.OrbaxSource(out / "params")
    ours = sources.OrbaxSource(merge_checkpoint(step, lora=fixture_lora).output / "params")
    assert theirs.tree == ours.tree
    got, want = theirs.read(theirs.tree), ours.read(ours.tree)
    for path, w in want.items():
        g, w32 = np.asarray(got[path], np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w32, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(w32).max(), err_msg=path)
