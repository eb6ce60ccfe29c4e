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


def on_local_base(adapter: pathlib.Path, base: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """A copy of `adapter`, written for a hub BASE, whose adapter_config.json names the local `base` instead, so that
    LeRobot loads it offline: what an adapter on a hub BASE holds (the trained tensors by the step's structure, every
    factor as the export wrote it), on the gated tests' BASE."""
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    hub_id = config["base_model_name_or_path"]
    assert "/" in hub_id, hub_id
    assert not pathlib.Path(hub_id).exists(), hub_id
    (out / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}, indent=2))
    return out


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


def openpi_jax() -> bool:
    """JAX at openpi 15a9616's pin (0.5.x), where two merges of one weight that differ only in how they are cut
    (sharded, chunked) are bitwise equal."""
    import jax

    return jax.__version_info__ < (0, 6)


def assert_same_merge(got, want, err_msg: str = "") -> None:
    """Two merges of one weight that differ only in how XLA orders the float32 arithmetic (sharded vs one device,
    column chunks vs the whole slice): bitwise on openpi's JAX. Newer XLA CPU dots may round a piece's products
    differently, so there they agree up to the output dtype's rounding of a float32 difference: within 2 float32
    eps of the weight's scale, and, for a bf16 output, where that difference flips the final rounding, within one
    ulp of the element in the output dtype (one bf16 element one ulp apart, 0.0610 vs 0.0608, on JAX 0.10)."""
    import ml_dtypes
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, err_msg
    if openpi_jax():
        np.testing.assert_array_equal(got, want, err_msg=err_msg)
        return
    g, w = got.astype(np.float32), want.astype(np.float32)
    bound = np.full(w.shape, 2 * np.finfo(np.float32).eps * np.abs(w).max(), np.float32)
    if want.dtype != np.float32:
        mantissa_bits = ml_dtypes.finfo(want.dtype).nmant
        magnitude = np.maximum(np.abs(g), np.abs(w))
        exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
        bound = np.maximum(bound, np.exp2(exponent - mantissa_bits).astype(np.float32))
    bad = np.abs(g - w) > bound
    assert not bad.any(), (
        f"{err_msg}: {int(bad.sum())} of {w.size} elements beyond the output dtype's rounding, e.g. at "
        f"{np.argwhere(bad)[0].tolist()}: {g[bad][0]} vs {w[bad][0]} (bound {bound[bad][0]:.3g})"
    )
