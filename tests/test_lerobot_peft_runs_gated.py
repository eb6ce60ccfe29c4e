"""PEFT adapters of tiny openpi fine-tunes served by LeRobot 0.6.1 on one base, against openpi's JAX LoRA models
(issue 32).

Needs upstream openpi here (train.py runs, exports, JAX references) and LeRobot's Python (`lerobot[pi,peft]==0.6.1`)
named by OPENPI_MERGE_LEROBOT_PYTHON; skipped without either, never run by CI (markers `openpi`, `lerobot`).

Two fine-tunes each, from the same frozen weights, 10 train.py steps each (`CASES`): pi0 `debug_lora`, pi0.5
`my_pi05_lora` (its PaliGemma has no LoRA and trains in full; its action expert has LoRA). Everything is made by the
command line: BASE is the first run's step merged at strength 0 (`openpi-merge-lora STEP --strength 0`) and exported
with `export --format lerobot` (its frozen weights, and its trained ones as they are). Every step is exported merged
(`export --format lerobot`) and as an adapter on BASE (`export --format lerobot-peft --base BASE`); each first run
also with `--base lerobot/pi0_base`, a hub id (the trained tensors by the step's structure), its adapter_config.json
then pointed at the local BASE so that LeRobot loads it offline. `lerobot_support/peft_check.py`, in LeRobot's
Python, loads each adapter with `make_policy` (`use_peft`), compares its actions with `jax_reference.py`'s (openpi's
JAX LoRA model, same observation and noise) and with the merged export's, checks `merge_and_unload()` against the
merged export, and loads both fine-tunes' adapters on one base and switches between them.

    OPENPI_MERGE_LEROBOT_PYTHON=/work/lerobot-venv/bin/python PYTHONPATH=. \
        OPENPI_VENV/bin/python -m pytest -m lerobot tests/test_lerobot_peft_runs_gated.py -s

OPENPI_MERGE_TEST_RUNS_DIR=DIR keeps the trained runs there and reuses them (development only).
"""

import json
import os
import pathlib
import subprocess

import numpy as np
from openpi_support import gate
import pytest

LEROBOT_PYTHON = os.environ.get("OPENPI_MERGE_LEROBOT_PYTHON", "")
if not pathlib.Path(LEROBOT_PYTHON).is_file():
    pytest.skip("LeRobot's Python is not given (OPENPI_MERGE_LEROBOT_PYTHON)", allow_module_level=True)
openpi_config = gate.require_openpi()
from helpers import on_local_base  # noqa: E402
from lerobot_support import jax_reference  # noqa: E402
from openpi.shared import normalize  # noqa: E402
import training  # noqa: E402

from openpi_merge_plugin.cli import app as cli  # noqa: E402

pytestmark = [pytest.mark.openpi, pytest.mark.lerobot]
CHECK = pathlib.Path(__file__).resolve().parent / "lerobot_support" / "peft_check.py"
# kind -> (config, [(run, train.py flags)])
# The second fine-tune of each starts from the same frozen weights and trains otherwise: pi0's `debug_lora` (its LLM
# initialised from the seed) on other data (batch size 4) at a learning rate high enough to move it (its own schedule
# barely leaves the initial adapters in 10 steps); pi0.5's `my_pi05_lora` (its LLM from a fixed-seed weight loader)
# from another seed (other LoRA, SigLIP and projection inits, other data).
FAST_LR = ("--lr-schedule.warmup-steps", "2", "--lr-schedule.peak-lr", "3e-3")
CASES = {
    "pi0": ("debug_lora", [("a", ()), ("b", ("--batch-size", "4", *FAST_LR))]),
    "pi05": ("my_pi05_lora", [("a", ()), ("b", ("--seed", "1"))]),
}
STEP = 9
ACTION_FLOOR = 2.8e-5  # what the merged LeRobot export meets against the JAX LoRA model (docs/lerobot.md)
EXPORT = ["--precision", "float32", "--device", "cpu", "--allow-nonstandard-dims", "--no-progress"]


def _export(src: pathlib.Path, output: pathlib.Path, *flags: str) -> dict:
    """`openpi-merge-lora export SRC --output OUTPUT FLAGS`, float32, for the CPU; its manifest."""
    assert cli.main(["export", str(src), "--output", str(output), *EXPORT, *flags]) == 0
    return json.loads((output / "manifest.json").read_text())


def _known_norm_stats(step: pathlib.Path, config) -> pathlib.Path:
    """Known, non-trivial norm stats with quantiles under the config's asset id, in the step and its merge (as
    test_lerobot_gated.py writes them)."""
    data = config.data.create(config.assets_dirs, config.model)
    folder = pathlib.Path("assets") / (data.asset_id or data.repo_id)
    ramp = np.linspace(0.0, 1.0, config.model.action_dim)
    mean, std = -0.5 + ramp, 0.5 + ramp
    stats = {
        key: normalize.NormStats(mean=mean, std=std, q01=mean - 2 * std, q99=mean + 2.5 * std)
        for key in ("state", "actions")
    }
    for root in (step, step / "merged"):
        if root.is_dir():
            normalize.save(root / folder, stats)
    return step / folder


def _run(kind: str, run: str, flags: tuple[str, ...], tmp: pathlib.Path) -> pathlib.Path:
    config = CASES[kind][0]
    runs = os.environ.get("OPENPI_MERGE_TEST_RUNS_DIR")
    base = pathlib.Path(runs) / f"peft-{kind}-{run}" if runs else tmp / run
    step = training.step_dir(base, config, "peft", STEP)
    if not step.exists():
        base.mkdir(parents=True, exist_ok=True)
        training.train(base, config, "peft", "--keep-period", "None", *flags)
    return step


@pytest.fixture(scope="module", params=list(CASES))
def compared(request, tmp_path_factory) -> dict:
    kind = request.param
    name, runs = CASES[kind]
    tmp = tmp_path_factory.mktemp(kind)
    lora_cfg, serving = openpi_config.get_config(name), openpi_config.get_config(f"{name}_merged")
    source = ["--config", name]
    steps = {run: _run(kind, run, flags, tmp) for run, flags in runs}
    first = next(iter(steps))
    base_merged, base = tmp / "base_merged", tmp / "base_lerobot"
    assert cli.main([str(steps[first]), *source, "--strength", "0", "--output", str(base_merged), "--no-progress"]) == 0
    stats_dirs = {run: _known_norm_stats(step, lora_cfg) for run, step in steps.items()}
    _known_norm_stats(base_merged, lora_cfg)
    _export(base_merged, base, "--format", "lerobot")
    adapters, manifests = [], {}
    for run, step in steps.items():
        merged = tmp / f"{run}_merged"
        _export(step, merged, "--format", "lerobot", *source)
        refs = tmp / f"{run}_reference"
        refs.mkdir()
        jax_reference.write(refs, lora_cfg, serving, step / "params", stats_dirs[run])
        bases = {run: str(base)}
        if run == first:  # what the step trained, as an adapter on a hub BASE holds it (loaded on the local BASE)
            bases[f"{run}_trained"] = "lerobot/pi0_base"
        for label, given in bases.items():
            out = tmp / f"{label}_adapter"
            manifests[label] = _export(step, out, "--format", "lerobot-peft", "--base", given, *source)
            if given != str(base):
                out = on_local_base(out, base, tmp / f"{label}_adapter_on_base")
            adapters.append({"name": label, "dir": str(out), "merged_export": str(merged), "reference_dir": str(refs)})
    meta = json.loads((tmp / f"{first}_reference" / "reference.json").read_text())
    job = {
        "kind": kind,
        "dims": meta["dims"],
        "adapters": adapters,
        "hot_swap": list(steps) if len(steps) > 1 else None,
    }
    (tmp / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS", "JAX_PLATFORMS")}
    cmd = [LEROBOT_PYTHON, str(CHECK), str(tmp / "job.json"), str(tmp / "out.json")]
    proc = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    print(f"\n{kind} ({name}):\n{proc.stdout}")
    return {"kind": kind, "lerobot": json.loads((tmp / "out.json").read_text()), "manifests": manifests}


def test_make_policy_loads_every_tensor_of_each_adapter(compared):
    for label, got in compared["lerobot"]["adapters"].items():
        assert got["loading"]["use_peft"] is True, label
        assert got["loading"]["class"] == "PeftModel", label
        assert got["loading"]["warnings"] == [], label
        assert "All keys loaded successfully!" in got["loading"]["printed"], (label, got["loading"]["printed"])
        state = got["adapter_state"]
        assert state["file_tensors"] == state["loaded_tensors"] > 0, label
        for problem in ("only_in_file", "only_in_model", "not_bitwise_equal", "load_adapter_missing"):
            assert state[problem] == [], (label, problem, state[problem])
        assert state["load_adapter_unexpected"] == [], label


def test_adapter_actions_match_the_jax_lora_model(compared):
    """Same observation and noise, float32: the adapter on BASE, loaded by make_policy, is within the floor the merged
    LeRobot export meets against openpi's JAX LoRA model, and about as close as the merged export itself."""
    for label, got in compared["lerobot"]["adapters"].items():
        a = got["actions"]
        assert a["adapter_vs_jax_lora"] <= ACTION_FLOOR, (label, a)
        assert a["adapter_vs_jax_lora"] <= 0.02 * a["jax_base_vs_jax_lora"], (label, a)
        assert a["adapter_vs_merged_export"] <= 1e-5, (label, a)


def test_merge_and_unload_is_our_merged_export(compared):
    for label, got in compared["lerobot"]["adapters"].items():
        merge = got["merge_and_unload"]
        assert merge["only_in_merge"] == merge["only_in_export"] == [], label
        assert merge["max_rel_err"] <= 1e-6, (label, merge)


def test_hot_swap_between_two_fine_tunes_on_one_base(compared):
    """The second fine-tune's adapter loaded beside the first (`load_adapter`), `set_adapter` back and forth: each
    gives its own merged export's actions, every repeat the same bits, and the two differ."""
    swap = compared["lerobot"]["hot_swap"]
    assert swap["load_adapter_missing"] == swap["load_adapter_unexpected"] == []
    for run in ("a", "b"):
        assert swap[run]["vs_own_merged_export"] <= 1e-5, (run, swap)
        assert swap[run]["repeats_bitwise_equal"], (run, swap)
    assert swap["adapters_differ_by"] >= 100 * max(swap[r]["vs_own_merged_export"] for r in ("a", "b")), swap


def test_base_check_and_modules_to_save(compared):
    """BASE (the first run's step merged at strength 0) is bitwise that step's own weights: its adapter saves
    nothing. The second run's: its trainable tensors that differ from BASE, and only those, as whole modules (pi0's
    debug runs give SigLIP and the projector no gradient: they keep their initial values, bitwise, and stay with
    BASE). By structure (a hub BASE) every trainable module is saved: SigLIP and the projector too, and for pi0.5,
    whose PaliGemma has no LoRA and trains in full, the whole PaliGemma."""
    manifests = compared["manifests"]
    check = manifests["a"]["base"]["check"]
    assert check["bitwise_equal"] == check["tensors_compared"] > 0, check
    assert manifests["a"]["adapter"]["modules_to_save"] == []
    trained = manifests["a_trained"]["adapter"]["modules_to_save"]
    b = manifests["b"]["adapter"]
    assert b["saved_tensors"] >= manifests["b"]["base"]["check"]["differ_trained"] > 0
    print(compared["kind"], "second fine-tune saves", b["modules_to_save"], "; by structure:", trained)
    if compared["kind"] == "pi0":
        assert set(b["modules_to_save"]) <= set(trained)
        assert "model.state_proj" in b["modules_to_save"]
        assert "model.paligemma_with_expert.paligemma.model.vision_tower" in trained
    else:
        assert "model.paligemma_with_expert.paligemma" in trained, trained
