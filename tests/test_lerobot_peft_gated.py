"""PEFT adapters of the bundled example loaded by LeRobot 0.6.1 through its own factory (issue 32): an independent
library checks the merge.

Needs LeRobot's Python (3.12, `lerobot[pi,peft]==0.6.1`) named by OPENPI_MERGE_LEROBOT_PYTHON; skipped without it,
never run by CI (marker `lerobot`). Not openpi: the bundled step (tests/data/openpi-15a9616/lora-tiny) is exported here
three ways: its merge (`export --format lerobot`, float32), BASE (the same step merged at strength 0, then exported:
the step's own frozen and trained weights, no adapters; issue 31 will export a base checkpoint directly), and two
adapters on BASE: with BASE local (only what differs from it is saved: nothing) and with the trained tensors read off
the step's structure (SigLIP, projector and action projections in `modules_to_save`), which is what an adapter on a
hub BASE holds. `lerobot_support/peft_check.py`, in LeRobot's Python, loads each with `make_policy` (`use_peft`)
at the example's dimensions (4 heads: LeRobot cannot run it forward, only load and merge it; the actions are
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
import pytest

from openpi_merge_plugin.options import MergeOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import lerobot_export
from openpi_merge_plugin.pipeline import lerobot_peft_export

LEROBOT_PYTHON = os.environ.get("OPENPI_MERGE_LEROBOT_PYTHON", "")
if not pathlib.Path(LEROBOT_PYTHON).is_file():
    pytest.skip("LeRobot's Python is not given (OPENPI_MERGE_LEROBOT_PYTHON)", allow_module_level=True)

pytestmark = pytest.mark.lerobot
CHECK = pathlib.Path(__file__).resolve().parent / "lerobot_support" / "peft_check.py"
MODEL = json.loads((FIXTURE / "model_config.json").read_text())
LORA = checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)
HORIZON = lerobot_export.LeRobotModel(MODEL["pi0_config"]["action_horizon"])
CPU = lerobot_export.Naming(device="cpu")


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
    export = {"precision": "float32", "model": HORIZON, "naming": CPU, "allow_nonstandard_dims": True}
    merged = lerobot_export.export_lerobot(step, output=tmp / "merged_lerobot", lora=LORA, **export).output
    base_merged = checkpoint_merge.merge_checkpoint(
        step, output=tmp / "base_merged", lora=LORA, options=MergeOptions(strength=0.0)
    ).output
    base = lerobot_export.export_lerobot(base_merged, output=tmp / "base_lerobot", **export).output
    local = lerobot_peft_export.export_lerobot_peft(
        step, base=lerobot_peft_export.BaseRef.parse(base), output=tmp / "adapter_local", lora=LORA, **export
    )
    # The structure rule (what an adapter on a hub BASE holds), pointing at the local BASE so that LeRobot loads it.
    structural = lerobot_peft_export.export_lerobot_peft(
        step, base=lerobot_peft_export.BaseRef(str(base), None), output=tmp / "adapter_trained", lora=LORA, **export
    )
    job = {
        "kind": "pi0",
        "dims": _dims(),
        "adapters": [
            {"name": name, "dir": str(result.output), "merged_export": str(merged), "reference_dir": None}
            for name, result in (("local", local), ("trained", structural))
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
        "manifests": {"local": local.manifest, "trained": structural.manifest},
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
