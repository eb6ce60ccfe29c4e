"""Merge on save inside openpi's own scripts/train.py (needs upstream openpi and its scripts; skipped otherwise).

Each run trains openpi's `debug_lora` config shipped by the plugin (dummy gemma with LoRA, fake data) with openpi's
unmodified scripts/train.py in a subprocess, as a user would; `run_openpi_script.py` only shrinks the SigLIP image
encoder so that a CPU step takes a second (see there).
"""

import dataclasses
import json
import pathlib
import shutil

from helpers import TREES
from helpers import read_leaves
from helpers import run_python
import numpy as np
from openpi_support import gate
import pytest

openpi_config = gate.require_openpi()
import run_openpi_script  # noqa: E402,F401  (the same tiny SigLIP in this process)
import training  # noqa: E402

from openpi_merge_plugin.checkpoint import sources  # noqa: E402
from openpi_merge_plugin.checks import integrity  # noqa: E402
from openpi_merge_plugin.errors import IntegrityError  # noqa: E402
from openpi_merge_plugin.openpi_glue import host_copy  # noqa: E402
from openpi_merge_plugin.pipeline import checkpoint_merge  # noqa: E402

pytestmark = pytest.mark.openpi
CONFIG = "debug_lora"


def _train(base: pathlib.Path, exp: str, *flags: str, devices: int = 1, check: bool = True, kill: str = "", **kw):
    """Runs openpi's scripts/train.py on the debug_lora config; returns its log."""
    return training.train(base, CONFIG, exp, *flags, devices=devices, check=check, kill=kill, **kw)


def _ckpt(base: pathlib.Path, exp: str) -> pathlib.Path:
    return base / "ckpt" / CONFIG / exp


def _assert_equals_offline_merge(step: pathlib.Path, tmp: pathlib.Path) -> None:
    offline = checkpoint_merge.merge_checkpoint(
        step, output=tmp / f"offline-{step.parent.name}-{step.name}", lora=checkpoint_merge.LoRASource(config=CONFIG)
    )
    got, want = read_leaves(step / "merged" / "params"), read_leaves(offline.output / "params")
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].tobytes() == want[path].tobytes(), path


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    base = tmp_path_factory.mktemp("single")
    return base, _train(base, "single", "--keep-period", "None")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    return base, _train(base, "sharded", "--keep-period", "None", "--fsdp-devices", "2", devices=2)


@pytest.mark.openpi_ci
def test_every_save_merges_and_retention_deletes_merged_with_its_step(single, tmp_path):
    base, log = single
    ckpt = _ckpt(base, "single")
    for step in (5, 9):
        assert f"Merged the LoRA adapters of step {step} into {ckpt / str(step) / 'merged'}" in log
    # max_to_keep=1 (openpi's setting) and no keep_period: step 5 went away, and its merged/ with it.
    assert sorted(p.name for p in ckpt.iterdir()) == ["9"]
    manifest = json.loads((ckpt / "9" / "merged" / "manifest.json").read_text())
    assert manifest["serving_config"] == f"{CONFIG}_merged"
    assert manifest["source"]["step"] == 9
    assert manifest["output"] == str(ckpt / "9" / "merged")
    assert integrity.verify_merged(ckpt / "9" / "merged").ok
    _assert_equals_offline_merge(ckpt / "9", tmp_path)


def test_serving_config_reproduces_the_lora_policy(single):
    import jax
    import jax.numpy as jnp
    from openpi.models import model as _model
    from openpi.policies import policy_config

    base, _ = single
    step = _ckpt(base, "single") / "9"
    lora_config, serving_config = openpi_config.get_config(CONFIG), openpi_config.get_config(f"{CONFIG}_merged")
    assert serving_config.model.paligemma_variant == "dummy"
    assert serving_config.model.action_expert_variant == "dummy"
    obs = jax.tree.map(lambda x: np.asarray(x[0]), lora_config.model.fake_obs().to_dict())
    noise = (
        np.random.default_rng(0)
        .standard_normal((lora_config.model.action_horizon, lora_config.model.action_dim))
        .astype(np.float32)
    )

    # float32 serving (float32 params and compute): the two models differ only in how the LoRA term is computed
    # (separate einsums vs folded into W), i.e. float32 rounding; through 10 flow steps of a 4-layer model that
    # stays below 1e-5 of the actions' scale.
    def actions_f32(config, params_dir):
        model_config = dataclasses.replace(config.model, dtype="float32")
        model = model_config.load(_model.restore_params(params_dir, dtype=jnp.float32))
        observation = _model.Observation.from_dict(jax.tree.map(lambda x: jnp.asarray(x)[None], obs))
        return np.asarray(model.sample_actions(jax.random.key(0), observation, noise=jnp.asarray(noise)[None]))[0]

    lora_f32 = actions_f32(lora_config, step / "params")
    merged_f32 = actions_f32(serving_config, step / "merged" / "params")
    assert np.max(np.abs(merged_f32 - lora_f32)) <= 1e-5 * np.max(np.abs(lora_f32))

    # bfloat16 serving through openpi's own create_trained_policy (it loads every param as bf16): the LoRA model
    # rounds W, A and B to bf16 and runs the LoRA term separately, the merged one rounds W + dW; both are bf16
    # approximations of the same float32 model, each off by a few bf16 ulps (2^-8 relative) per layer.
    lora_policy = policy_config.create_trained_policy(lora_config, step, norm_stats={})
    merged_policy = policy_config.create_trained_policy(serving_config, step / "merged", norm_stats={})
    lora_bf16 = lora_policy.infer(obs, noise=noise)["actions"]
    merged_bf16 = merged_policy.infer(obs, noise=noise)["actions"]
    scale = np.max(np.abs(lora_f32))
    assert np.max(np.abs(merged_bf16 - lora_f32)) <= 3e-2 * scale
    assert np.max(np.abs(merged_bf16 - lora_bf16)) <= 3e-2 * scale


def test_fsdp_sharded_training_merges_like_one_device(sharded, tmp_path):
    base, log = sharded
    step = _ckpt(base, "sharded") / "9"
    assert f"Merged the LoRA adapters of step 9 into {step / 'merged'}" in log
    # The params really were FSDP-sharded over the 2 devices: Orbax wrote each shard of the big weights separately.
    written = json.loads((step / "params" / "array_metadatas" / "process_0").read_text())["array_metadatas"]
    write_shapes = {m["array_metadata"]["param_name"]: m["array_metadata"]["write_shape"] for m in written}
    gating = sources.OrbaxSource(step / "params").tree["PaliGemma/llm/layers/mlp/gating_einsum"].shape
    assert write_shapes["params.PaliGemma.llm.layers.mlp.gating_einsum.value"] != list(gating)
    assert integrity.verify_merged(step / "merged").ok
    # Merging the live sharded params gave, bitwise, what merging the same params on one device gives. (The
    # single-device run is a different training, it sees other batches, so its weights are not comparable.)
    _assert_equals_offline_merge(step, tmp_path)


def test_final_only_with_ema_merges_the_saved_ema_params(tmp_path):
    log = _train(tmp_path, "ema", "--keep-period", "5", "--ema-decay", "0.9", "--merge-lora.when", "final")
    ckpt = _ckpt(tmp_path, "ema")
    assert "Merged the LoRA adapters of step 5" not in log
    assert not (ckpt / "5" / "merged").exists()
    assert (ckpt / "5" / "params").is_dir()
    assert integrity.verify_merged(ckpt / "9" / "merged").ok
    _assert_equals_offline_merge(ckpt / "9", tmp_path)
    # What was merged are the EMA params openpi saves as `params`, not the raw params kept in train_state.
    path = "action_in_proj/kernel"
    merged = read_leaves(ckpt / "9" / "merged" / "params")[path]
    ema = read_leaves(ckpt / "9" / "params")[path]
    raw = sources.OrbaxSource(ckpt / "9" / "train_state")
    raw = raw.read([path])[path]
    assert merged.tobytes() == ema.tobytes()
    assert not np.array_equal(merged, raw)


@pytest.mark.parametrize("config", ["debug_pi05_lora", "debug_pi0_fast_lora"])
def test_shipped_pi05_and_pi0_fast_configs_merge_on_save(config, tmp_path):
    """The tiny pi0.5 (adaRMS action expert) and pi0-FAST (gemma_fast) configs shipped in configs/: every save
    merges, the merge is what the offline command gives, and the manifest's serving config resolves and loads it.
    (tests/test_openpi_serving_twins.py serves such merges and compares their actions and logits.)"""
    log = training.train(tmp_path, config, "shipped", "--keep-period", "5")
    for step in (5, 9):
        step_dir = training.step_dir(tmp_path, config, "shipped", step)
        assert f"Merged the LoRA adapters of step {step} into {step_dir / 'merged'}" in log
        assert integrity.verify_merged(step_dir / "merged").ok
    offline = checkpoint_merge.merge_checkpoint(
        step_dir, output=tmp_path / "offline", lora=checkpoint_merge.LoRASource(config=config)
    )
    got, want = read_leaves(step_dir / "merged" / "params"), read_leaves(offline.output / "params")
    assert got.keys() == want.keys()
    assert all(got[p].tobytes() == want[p].tobytes() for p in want)
    manifest = json.loads((step_dir / "merged" / "manifest.json").read_text())
    assert manifest["serving_config"] == f"{config}_merged"
    serving = openpi_config.get_config(manifest["serving_config"])
    serving.model.load(_model_restore(step_dir / "merged" / "params"))  # strict: every param present, same shapes


def _model_restore(params_dir: pathlib.Path):
    from openpi.models import model as _model

    return _model.restore_params(params_dir)


def test_failed_merge_is_recorded_and_training_goes_on(tmp_path):
    log = _train(tmp_path, "fails", "--keep-period", "5", "--merge-lora.tolerance", "1e-12")
    ckpt = _ckpt(tmp_path, "fails")
    assert "merging the LoRA adapters of step 5 FAILED" in log
    assert "does not reproduce the LoRA forward" in log
    for step in ("5", "9"):
        marker = json.loads((ckpt / step / "merged" / "MERGE_FAILED.json").read_text())
        assert marker["step"] == int(step)
        assert marker["error"].startswith("VerificationError")
        assert sorted(p.name for p in (ckpt / step / "merged").iterdir()) == ["MERGE_FAILED.json"]
        assert (ckpt / step / "params").is_dir()
        assert (ckpt / step / "train_state").is_dir()
    with pytest.raises(IntegrityError, match=r"the merge on save of this step failed \(VerificationError: merged"):
        integrity.verify_merged(ckpt / "9" / "merged")


def test_fatal_failure_stops_training_after_the_lora_step_is_committed(tmp_path):
    code, log = _train(tmp_path, "fatal", "--merge-lora.tolerance", "1e-12", "--merge-lora.fatal", check=False)
    ckpt = _ckpt(tmp_path, "fatal")
    assert code != 0
    assert "VerificationError" in log
    assert sorted(p.name for p in ckpt.iterdir()) == ["5"]
    assert (ckpt / "5" / "params").is_dir()
    assert (ckpt / "5" / "merged" / "MERGE_FAILED.json").is_file()


@pytest.mark.openpi_ci
def test_resume_continues_and_keeps_merging(single, tmp_path):
    src = _ckpt(single[0], "single")
    shutil.copytree(src, _ckpt(tmp_path, "resumed"))
    code, log = _train(
        tmp_path,
        "resumed",
        "--resume",
        "--no-overwrite",
        "--keep-period",
        "None",
        "--num-train-steps",
        "15",
        check=False,
    )
    assert code == 0, log[-5000:]
    ckpt = _ckpt(tmp_path, "resumed")
    # It went on from the restored step (openpi saves again only at the last step here), not from scratch.
    assert "Merged the LoRA adapters of step 5" not in log
    assert "Merged the LoRA adapters of step 14" in log
    assert sorted(p.name for p in ckpt.iterdir()) == ["14"]
    assert integrity.verify_merged(ckpt / "14" / "merged").ok


@pytest.mark.openpi_ci
def test_serving_names_resolve_for_configs_registered_later_in_a_fresh_process():
    code = """
import dataclasses
import openpi.training.config as c
late = dataclasses.replace(c.get_config("pi0_libero_low_mem_finetune"), name="my_late_lora")
c._CONFIGS_DICT[late.name] = late
s = c.get_config("my_late_lora_merged")
print(s.name, s.model.paligemma_variant, s.model.action_expert_variant, s.merge_lora_on_save)
try:
    c.get_config("pi0_libero_merged")
except ValueError as e:
    print("no serving config for a non-LoRA config:", e)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    assert "my_late_lora_merged gemma_2b gemma_300m False" in proc.stdout
    assert "no serving config for a non-LoRA config: Config 'pi0_libero_merged' not found." in proc.stdout


@pytest.mark.openpi_ci
def test_switched_off_by_environment_variable():
    code = "import openpi.training.config as c; print('merge_lora_on_save' in c.TrainConfig.__dataclass_fields__)"
    assert run_python(code).stdout.strip() == "True"
    assert run_python(code, OPENPI_MERGE_PLUGIN_DISABLE="1").stdout.strip() == "False"


def _assert_committed_steps_complete(ckpt: pathlib.Path, committed: list[str]) -> None:
    steps = sorted(p.name for p in ckpt.iterdir() if p.name.isdigit())
    assert steps == committed
    for step in steps:  # each with its LoRA checkpoint and a merged checkpoint that verifies against it
        assert integrity.verify_merged(ckpt / step / "merged").ok


@pytest.mark.openpi_ci
def test_killed_during_the_first_merge_while_training_goes_on(tmp_path):
    code, _ = _train(tmp_path, "killed", "--keep-period", "5", "--no-overwrite", check=False, kill="merge_slice:20")
    ckpt = _ckpt(tmp_path, "killed")
    assert code == -9  # half-way through step 5's merge, in the background: the step is not committed
    _assert_committed_steps_complete(ckpt, [])
    # --resume finds no step, so it starts afresh; it finishes with verified merges.
    log = _train(tmp_path, "killed", "--keep-period", "5", "--resume", "--no-overwrite")
    assert "Merged the LoRA adapters of step 9" in log
    _assert_committed_steps_complete(ckpt, ["5", "9"])
    assert not list(ckpt.glob(".merged-*"))


# Kill points in the async phase of step 9's save (after save_state returned): the merge starting in the background,
# half-way through it (debug_lora's merges make 40 `merge_slice` calls each), the commit moving it into its step,
# and the moment after that, when Orbax has not committed the step yet.
ASYNC_KILL_POINTS = [
    "write_staged:2",
    pytest.param("merge_slice:60", marks=pytest.mark.openpi_ci),
    "move_into:2",
    "move_into:2:after",
]


@pytest.mark.parametrize("kill", ASYNC_KILL_POINTS)
def test_killed_in_the_async_phase_of_a_save_resumes_and_merges_on(kill, tmp_path):
    code, log = _train(tmp_path, "killed", "--keep-period", "5", "--no-overwrite", check=False, kill=kill)
    ckpt = _ckpt(tmp_path, "killed")
    assert code == -9, log[-3000:]
    assert "Merging the LoRA adapters of step 9 in the background" in log
    # Step 9 is not committed, step 5 is, with its LoRA checkpoint and a merged/ that verifies against it.
    _assert_committed_steps_complete(ckpt, ["5"])
    # --resume goes on from step 5, trains to step 9 and merges it; the killed merge's staging directory is gone.
    log = _train(tmp_path, "killed", "--keep-period", "5", "--resume", "--no-overwrite")
    assert "Merged the LoRA adapters of step 5" not in log
    assert "Merged the LoRA adapters of step 9" in log
    _assert_committed_steps_complete(ckpt, ["5", "9"])
    assert not list(ckpt.glob(".merged-*"))
    _assert_equals_offline_merge(ckpt / "9", tmp_path)


def test_blocking_mode_merges_as_before_and_the_same_bytes(single, tmp_path):
    """`--merge-lora.mode blocking`: the merge runs before the save returns; the same run's merges are, bitwise,
    what the offline command gives (as the async default's are: test_every_save_...)."""
    log = _train(tmp_path, "blocking", "--keep-period", "None", "--merge-lora.mode", "blocking")
    ckpt = _ckpt(tmp_path, "blocking")
    assert "in the background" not in log
    assert "Merged the LoRA adapters of step 9" in log
    assert sorted(p.name for p in ckpt.iterdir()) == ["9"]
    assert integrity.verify_merged(ckpt / "9" / "merged").ok
    _assert_equals_offline_merge(ckpt / "9", tmp_path)
    # The same training (same seed and data) as the async run: the same params, hence the same merged bytes.
    async_step = _ckpt(single[0], "single") / "9"
    got, want = read_leaves(ckpt / "9" / "merged" / "params"), read_leaves(async_step / "merged" / "params")
    assert got.keys() == want.keys()
    assert all(got[p].tobytes() == want[p].tobytes() for p in want)


def test_async_mode_is_refused_at_the_start_on_a_host_that_cannot_hold_the_params_copy(tmp_path):
    needed = host_copy.params_bytes(openpi_config.get_config(CONFIG)) + host_copy.MERGE_OVERHEAD_BYTES
    available = {"OPENPI_MERGE_TEST_AVAILABLE_BYTES": str(needed - 1)}
    code, log = _train(tmp_path, "refused", check=False, extra_env=available)
    assert code != 0
    assert "merge_lora.mode async keeps a host copy of the params while it merges in the background" in log
    assert "use --merge-lora.mode blocking" in log
    assert "Step 0" not in log  # refused before the model was built or trained
    assert not list(_ckpt(tmp_path, "refused").glob("*/params"))
    # Blocking mode needs no such copy: the same host trains and merges.
    log = _train(tmp_path, "refused", "--merge-lora.mode", "blocking", "--overwrite", extra_env=available)
    assert "Merged the LoRA adapters of step 9" in log


def test_the_host_copy_is_sized_from_the_config_as_openpi_saves_the_params():
    """pi0's params as openpi's train.py stores them (frozen weights bf16), from the config's shapes alone, are the
    bytes of openpi 15a9616's pi0_lora params tree (tests/data/openpi-15a9616/trees, written by openpi). In a fresh
    process: this one has the tests' tiny SigLIP."""
    tree = json.loads((TREES / "pi0_lora.json").read_text())["params"]
    want = sum(
        int(np.prod(leaf["shape"])) * (2 if leaf["frozen"] else np.dtype(leaf["dtype"]).itemsize)
        for leaf in tree.values()
    )
    code = (
        "import openpi.training.config as c; from openpi_merge_plugin.openpi_glue import host_copy; "
        "print(host_copy.params_bytes(c.get_config('pi0_libero_low_mem_finetune')))"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.split()[-1]) == want
