"""The openpi-gated test modules' one preamble: skip the module unless upstream openpi can run here.

    from openpi_support import gate
    openpi_config = gate.require_openpi()      # or require_openpi(pytorch=True)
    import run_openpi_script  # noqa: E402     (importable once require_openpi returned)
    import training  # noqa: E402

With `OPENPI_MERGE_REQUIRE_OPENPI=1` (CI's openpi stage sets it) a missing piece fails the module instead of skipping
it, so a broken openpi environment cannot pass as a row of skips.
"""

import importlib
import os
import pathlib
import sys
import types

import pytest

SUPPORT = pathlib.Path(__file__).resolve().parent
HOW = "see docs/how-it-works.md: Development"


def _unavailable(reason: str) -> None:
    if os.environ.get("OPENPI_MERGE_REQUIRE_OPENPI") == "1":
        pytest.fail(f"OPENPI_MERGE_REQUIRE_OPENPI=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def _import(name: str, reason: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError as e:
        _unavailable(f"{reason} ({e}; {HOW})")
        return None


def require_openpi(*, training: bool = True, pytorch: bool = False) -> types.ModuleType:
    """Returns `openpi.training.config` once upstream openpi is importable and, for `training`, the plugin's start-up
    hook is active and openpi's scripts/train.py is found, and, for `pytorch`, torch and openpi's PyTorch model
    import; skips the calling module otherwise. Puts tests/openpi_support on sys.path (`run_openpi_script`,
    `training`)."""
    openpi_config = _import("openpi.training.config", "upstream openpi is not importable here")
    if training and "merge_lora_on_save" not in openpi_config.TrainConfig.__dataclass_fields__:
        _unavailable("the plugin's start-up hook is not active in this interpreter (reinstall the package)")
    if pytorch:
        _import("torch", "torch is not installed")
        _import("openpi.models_pytorch.gemma_pytorch", "openpi's PyTorch model does not import here")
    if str(SUPPORT) not in sys.path:
        sys.path.insert(0, str(SUPPORT))
    if training:
        scripts = importlib.import_module("training")
        if not scripts.TRAIN_SCRIPT.is_file():
            _unavailable(f"openpi's scripts/train.py not found under {scripts.OPENPI_REPO} (set OPENPI_REPO)")
    return openpi_config
