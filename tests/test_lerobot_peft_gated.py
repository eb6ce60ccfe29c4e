"""PEFT adapters of the bundled example loaded by LeRobot 0.6.1 through its own factory (issue 32): an independent
library checks the merge.

Needs LeRobot's Python (3.12, `lerobot[pi,peft]==0.6.1`) named by OPENPI_MERGE_LEROBOT_PYTHON; skipped without it,
never run by CI (marker `lerobot`). Not openpi: the bundled step (tests/data/openpi-15a9616/lora-tiny) is exported
here by the command line, three ways: its merge (`export --format lerobot`, float32), BASE (the same step merged at
strength 0, then `export --format lerobot`: the step's own frozen and trained weights, no adapters), and two adapters
(`export --format lerobot-peft`): `--base BASE` local (only what differs from it is saved: nothing) and `--base
lerobot/pi0_base`, a hub id (the trained tensors read off the step's structure: SigLIP, projector and action
projections in `modules_to_save`), its adapter_config.json then pointed at the local BASE so that LeRobot loads it
offline. `lerobot_support/peft_check.py`, in LeRobot's Python, loads each with `make_policy` (`use_peft`) at the
example's dimensions (4 heads: LeRobot cannot run it forward, only load and merge it; the actions are
`test_lerobot_peft_runs_gated.py`'s) and compares PEFT's `merge_and_unload()` with the merged export.

    OPENPI_MERGE_LEROBOT_PYTHON=/work/lerobot-venv/bin/python .venv/bin/python -m pytest -m lerobot \
        tests/test_lerobot_peft_gated.py -s
"""

import json
import os
import pathlib
import shutil
import subprocess

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import on_local_base
import pytest

from openpi_merge_plugin.cli import app as cli

LEROBOT_PYTHON = os.environ.get("OPENPI_MERGE_LEROBOT_PYTHON", "")
if not pathlib.Path(LEROBOT_PYTHON).is_file():
    pytest.skip("LeRobot's Python is not given (OPENPI_MERGE_LEROBOT_PYTHON)", allow_module_level=True)

pytestmark = pytest.mark.lerobot
CHECK = pathlib.Path(__file__).resolve().parent / "lerobot_support" / "peft_check.py"
MODEL = json.loads((FIXTURE / "model_config.json").read_text())
LORA = ["--lora-config", str(FIXTURE_LORA_CONFIG)]


def _export(src: pathlib.Path, output: pathlib.Path, *flags: str) -> dict:
    """`openpi-merge-lora export SRC --output OUTPUT FLAGS` at the example's dims, float32, for the CPU; its manifest."""
    horizon = str(MODEL["pi0_config"]["action_horizon"])
    argv = ["export", str(src), "--output", str(output), "--action-horizon", horizon, "--precision", "float32"]
    assert cli.main([*argv, "--device", "cpu", "--allow-nonstandard-dims", "--no-progress", *flags]) == 0
    return json.loads((output / "manifest.json").read_text())


def _dims() -> dict:
    """The example's dimensions, for LeRobot's modeling module (lerobot_check.tiny_dims)."""
    keys = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    variants = MODEL["gemma_variants"]
    pg, ae = (variants[MODEL["pi0_config"][k]] for k in ("paligemma_variant", "action_expert_variant"))
    siglip = MODEL["siglip_variant_patch"]
    return {
        "paligemma": {k: pg[k] for k in keys} | {"vocab_size": MODEL["paligemma_vocab_size"]},
        "action_expert": {k: ae[k] for k in keys},
        "siglip": {k: siglip[k] for k in ("width", "depth", "mlp_dim", "num_heads")} | {"patch_size": 14},
        "projection_dim": pg["width"],
    }


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("peft")
    step = tmp / "checkpoint" / "2"
    shutil.copytree(FIXTURE_STEP, step)
    merged = tmp / "merged_lerobot"
    _export(step, merged, "--format", "lerobot", *LORA)
    base_merged, base = tmp / "base_merged", tmp / "base_lerobot"
    assert cli.main([str(step), *LORA, "--strength", "0", "--output", str(base_merged), "--no-progress"]) == 0
    _export(base_merged, base, "--format", "lerobot")
    manifests = {"local": _export(step, tmp / "adapter_local", "--format", "lerobot-peft", "--base", str(base), *LORA)}
    hub = tmp / "adapter_hub"
    manifests["trained"] = _export(step, hub, "--format", "lerobot-peft", "--base", "lerobot/pi0_base", *LORA)
    dirs = {"local": tmp / "adapter_local", "trained": on_local_base(hub, base, tmp / "adapter_trained")}
    job = {
        "kind": "pi0",
        "dims": _dims(),
        "adapters": [
            {"name": name, "dir": str(out), "merged_export": str(merged), "reference_dir": None}
            for name, out in dirs.items()
        ],
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [LEROBOT_PYTHON, str(CHECK), str(tmp / "job.json"), str(tmp / "out.json")]
    proc = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(proc.stdout)
    return {
        "lerobot": json.loads((tmp / "out.json").read_text()),
        "manifests": manifests,
    }


@pytest.mark.parametrize("name", ["local", "trained"])
def test_make_policy_loads_every_tensor_of_the_adapter(checked, name):
    """Through LeRobot's `make_policy` with `use_peft`: a PeftModel on BASE, PEFT's own state dict of the adapter is
    the file (every key, bitwise), a second `load_adapter` reports nothing missing or unexpected, nothing warned."""
    got = checked["lerobot"]["adapters"][name]
    assert got["loading"]["use_peft"] is True
    assert got["loading"]["class"] == "PeftModel"
    assert got["loading"]["warnings"] == []
    assert "All keys loaded successfully!" in got["loading"]["printed"]  # BASE, by PI0Policy.from_pretrained
    state = got["adapter_state"]
    assert state["file_tensors"] == state["loaded_tensors"] > 0
    for problem in ("only_in_file", "only_in_model", "not_bitwise_equal", "load_adapter_missing"):
        assert state[problem] == [], (problem, state[problem])
    assert state["load_adapter_unexpected"] == []


@pytest.mark.parametrize("name", ["local", "trained"])
def test_merge_and_unload_is_our_merged_export(checked, name):
    """PEFT's `merge_and_unload()` of the loaded adapter on BASE equals `export --format lerobot` of the same step,
    every tensor, float32, to 1e-6 of each tensor's scale."""
    merge = checked["lerobot"]["adapters"][name]["merge_and_unload"]
    assert merge["only_in_merge"] == merge["only_in_export"] == []
    assert merge["dtypes"] == ["torch.float32"]
    assert merge["max_rel_err"] <= 1e-6, merge


def test_what_goes_in_modules_to_save(checked):
    """With BASE local and made of this step, nothing differs: no module to save. By the step's structure: SigLIP,
    the projector and the action projections (what openpi's freeze filter left trainable), as whole modules."""
    local, trained = (checked["manifests"][k]["adapter"] for k in ("local", "trained"))
    assert local["modules_to_save"] == []
    assert trained["modules_to_save"] == [
        "model.action_in_proj",
        "model.action_out_proj",
        "model.action_time_mlp_in",
        "model.action_time_mlp_out",
        "model.paligemma_with_expert.paligemma.model.multi_modal_projector",
        "model.paligemma_with_expert.paligemma.model.vision_tower",
        "model.state_proj",
    ]
