import os

# 8 fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib
import shutil

from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
import numpy as np
import pytest

from openpi_merge_plugin import lora_configs
from openpi_merge_plugin import sources


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
