"""The start-up hook that activates the plugin inside openpi, on a stand-in `openpi` package (runs without openpi).

The real thing is covered, with upstream openpi, by tests/test_openpi_train.py.
"""

import subprocess
import sys
import textwrap

from helpers import run_python
import pytest

from openpi_merge_plugin import bootstrap

# A minimal openpi.training.config in upstream's shape: a frozen TrainConfig, a config list built at import (one
# entry already uses the plugin's field), the registry dict and get_config.
FAKE_CONFIG = """
import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    num_train_steps: int = 30_000


_CONFIGS = [TrainConfig(name="plain"), TrainConfig(name="merging", merge_lora_on_save=True)]
_CONFIGS_DICT = {config.name: config for config in _CONFIGS}


def get_config(config_name: str) -> TrainConfig:
    if config_name not in _CONFIGS_DICT:
        raise ValueError(f"Config '{config_name}' not found.")
    return _CONFIGS_DICT[config_name]
"""


@pytest.fixture
def fake_openpi(tmp_path):
    package = tmp_path / "openpi" / "training"
    package.mkdir(parents=True)
    (tmp_path / "openpi" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(FAKE_CONFIG)
    return tmp_path


def _python(code: str, root, **env) -> subprocess.CompletedProcess:
    return run_python(textwrap.dedent(code), pythonpath=root, **env)


def _hook_installed() -> bool:
    return any(type(f).__name__ == "_Finder" for f in sys.meta_path)


pytestmark = pytest.mark.skipif(
    not _hook_installed(), reason="openpi_merge_plugin.pth is not installed (install the package, e.g. pip -e .)"
)

CHECK = """
import dataclasses
import openpi.training.config as c
merging = c.get_config("merging")
print(merging.merge_lora_on_save, merging.merge_lora.when, merging.merge_lora.output_dtype)
print(c.get_config("plain").merge_lora_on_save)
print([f.name for f in dataclasses.fields(c.TrainConfig)])
"""


def test_fields_exist_before_openpi_builds_its_config_list(fake_openpi):
    proc = _python(CHECK, fake_openpi)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "True every_save float32"
    assert lines[1] == "False"
    assert lines[2] == "['name', 'num_train_steps', 'merge_lora_on_save', 'merge_lora']"
    # What does not fit this stand-in is reported, once each, and the import still succeeds.
    assert "openpi-merge-plugin inactive: openpi has no config pi0_libero_low_mem_finetune" in proc.stderr


def test_environment_variable_switches_it_off_and_no_patched_bytecode_is_cached(fake_openpi):
    assert _python(CHECK, fake_openpi).returncode == 0  # a patched import first, as a cache would see it
    proc = _python(CHECK, fake_openpi, OPENPI_MERGE_PLUGIN_DISABLE="1")
    assert proc.returncode != 0
    assert "unexpected keyword argument 'merge_lora_on_save'" in proc.stderr


def test_a_config_module_without_train_config_is_left_alone(fake_openpi):
    (fake_openpi / "openpi" / "training" / "config.py").write_text("VALUE = 1\n")
    proc = _python("import openpi.training.config as c; print(c.VALUE)", fake_openpi)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    assert "openpi-merge-plugin inactive: openpi.training.config has no class TrainConfig" in proc.stderr


def test_processes_that_never_import_openpi_import_nothing_of_the_plugin_but_its_hook():
    proc = _python(
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('openpi', 'jax', 'orbax'))))", "/nonexistent"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['openpi_merge_plugin', 'openpi_merge_plugin.bootstrap']"


def test_install_is_idempotent():
    before = list(sys.meta_path)
    bootstrap.install()
    assert sys.meta_path == before
