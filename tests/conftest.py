import os

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import shutil
import subprocess
import sys

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import REPO
import numpy as np
import pytest

from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora import configs as lora_configs


@pytest.fixture
def fixture_lora():
    return lora_configs.from_file(FIXTURE_LORA_CONFIG)


@pytest.fixture
def step_dir(tmp_path) -> pathlib.Path:
    """A private copy of the fixture's step directory (tests may write next to it)."""
    dst = tmp_path / "checkpoint" / "2"
    shutil.copytree(FIXTURE_STEP, dst)
    return dst


@pytest.fixture(scope="session")
def fixture_params() -> dict[str, np.ndarray]:
    """The fixture's params, flat, as saved (bf16 base, fp32 adapters)."""
    src = sources.OrbaxSource(FIXTURE_STEP / "params")
    return src.read(src.tree)


@pytest.fixture(scope="session")
def merge_env(tmp_path_factory) -> dict[str, str]:
    """Environment for merges in subprocesses: this checkout importable, and one JAX compilation cache for all of
    them, filled by one merge of the fixture here, so that each later subprocess starts in seconds."""
    cache = tmp_path_factory.mktemp("jax-cache")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    step = tmp_path_factory.mktemp("warm-up") / "2"
    shutil.copytree(FIXTURE_STEP, step)
    cmd = [sys.executable, "-m", "openpi_merge_plugin.cli", str(step), "--lora-config", str(FIXTURE_LORA_CONFIG)]
    proc = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return env
