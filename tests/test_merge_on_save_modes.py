"""Merge on save's two modes, through the plugin's real save hook on a real Orbax CheckpointManager (no openpi).

`checkpoints` below stands in for `openpi.training.checkpoints` (its `initialize_checkpoint_dir` makes a manager with
openpi's item handlers and options, its `save_state` saves `{"params": {"params": ...}, "train_state": ...}`), and is
patched by `save_hook` as openpi's module is. The params are the bundled LoRA checkpoint's, as jax.Arrays. The
merge is held at its start (`held`) to look at a save while its merge has not run yet. The openpi-gated tests run
the same in openpi's own scripts/train.py (tests/test_openpi_train.py).
"""

import json
import logging
import sys
import threading
import time
import types

from helpers import FIXTURE_LORA_CONFIG
from helpers import read_leaves
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from openpi_merge_plugin import options
from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.checks import integrity
from openpi_merge_plugin.errors import VerificationError
from openpi_merge_plugin.lora import openpi_configs
from openpi_merge_plugin.openpi_glue import host_copy
from openpi_merge_plugin.openpi_glue import merged_item
from openpi_merge_plugin.openpi_glue import save_hook
from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions
from openpi_merge_plugin.pipeline import checkpoint_merge

STEPS = 10  # num_train_steps of the runs: step 9 is the last


def _checkpoints_module():
    """The two functions of openpi's checkpoints module the hook wraps, reduced to what they do with Orbax."""

    def initialize_checkpoint_dir(checkpoint_dir, *, keep_period, overwrite, resume):
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        mngr = module.ocp.CheckpointManager(
            checkpoint_dir,
            item_handlers={"train_state": ocp.PyTreeCheckpointHandler(), "params": ocp.PyTreeCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, keep_period=keep_period, create=False, async_options=ocp.AsyncOptions(timeout_secs=7200)
            ),
        )
        return mngr, False

    def save_state(checkpoint_manager, state, data_loader, step):
        checkpoint_manager.save(step, {"train_state": {"step": state["step"]}, "params": {"params": state["params"]}})

    module = types.SimpleNamespace(initialize_checkpoint_dir=initialize_checkpoint_dir, save_state=save_state, ocp=ocp)
    return module


class Run:
    """A training run's checkpointing: `save(step)` as scripts/train.py calls save_state, then a train step that
    donates the params' buffers (as openpi's does), so that nothing can read them after the save returned."""

    def __init__(self, directory, fixture_params, **merge_options):
        self.config = types.SimpleNamespace(
            name="fixture",
            exp_name="test",
            model=None,
            merge_lora_on_save=True,
            merge_lora=MergeOnSaveOptions(**merge_options),
            num_train_steps=STEPS,
        )
        self.checkpoints = _checkpoints_module()
        save_hook.patch_checkpoints(self.checkpoints)
        data_loaders = types.SimpleNamespace(create_data_loader=lambda config: types.SimpleNamespace())
        save_hook.patch_data_loader(data_loaders)
        self.loader = data_loaders.create_data_loader(self.config)
        self.manager, _ = self.checkpoints.initialize_checkpoint_dir(
            directory, keep_period=1, overwrite=False, resume=False
        )
        self.directory = directory
        self.params = jax.tree.map(jax.device_put, sources.unflatten(dict(fixture_params)))
        self.saved = {}  # step -> host copy of the params that step saved

    def save(self, step):
        self.saved[step] = jax.device_get(self.params)
        start = time.perf_counter()
        self.checkpoints.save_state(self.manager, {"step": step, "params": self.params}, self.loader, step)
        blocked = time.perf_counter() - start
        self.params = _train_step(self.params)
        return blocked


@jax.jit
def _next(params):
    return jax.tree.map(lambda x: (x * 0.5 + 1).astype(x.dtype), params)


_train_step = jax.jit(_next, donate_argnums=0)


@pytest.fixture
def lora(fixture_lora, monkeypatch):
    monkeypatch.setattr(openpi_configs, "lora_from_model", lambda model, config_name=None: fixture_lora)
    return fixture_lora


@pytest.fixture
def held(monkeypatch):
    """`merged_item.write_staged` held at its start until `release()`; records how many ran at once."""
    gate = threading.Event()
    state = types.SimpleNamespace(running=0, most=0, started=[], release=gate.set, lock=threading.Lock())
    real = merged_item.write_staged

    def write_staged(request):
        with state.lock:
            state.running += 1
            state.most = max(state.most, state.running)
            state.started.append(request.step)
        try:
            assert gate.wait(60), "the test never released the merge"
            return real(request)
        finally:
            with state.lock:
                state.running -= 1

    monkeypatch.setattr(merged_item, "write_staged", write_staged)
    return state


def _committed(run):
    return sorted(p.name for p in run.directory.iterdir() if p.name.isdigit())


def _assert_equals_offline_merge(step_dir, tmp_path):
    offline = checkpoint_merge.merge_checkpoint(
        step_dir,
        output=tmp_path / f"offline-{step_dir.name}",
        lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG),
    )
    got, want = read_leaves(step_dir / "merged" / "params"), read_leaves(offline.output / "params")
    assert got.keys() == want.keys()
    for path in want:
        assert got[path].dtype == want[path].dtype, path
        assert got[path].tobytes() == want[path].tobytes(), path


def test_an_async_save_returns_before_its_merge_and_the_step_is_committed_after_it(
    tmp_path, fixture_params, lora, held, monkeypatch
):
    wandb = types.SimpleNamespace(run=object(), calls=[])
    wandb.log = lambda *args, **kwargs: wandb.calls.append((args, kwargs))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    run = Run(tmp_path / "ckpt", fixture_params)
    run.save(5)  # returns although the merge has not started; the next train step donates the params
    assert held.started in ([], [5])
    time.sleep(0.5)
    assert _committed(run) == []  # only Orbax's temporary directory of step 5
    held.release()
    run.manager.wait_until_finished()
    assert _committed(run) == ["5"]
    step = run.directory / "5"
    assert integrity.verify_merged(step / "merged").ok
    # What was merged is the params as saved (the host copy the save took), not the next train step's.
    _assert_equals_offline_merge(step, tmp_path)
    saved = read_leaves(step / "params")
    assert all(saved[p].tobytes() == np.asarray(v).tobytes() for p, v in sources.flatten(run.saved[5]).items())
    manifest = json.loads((step / "merged" / "manifest.json").read_text())
    assert manifest["output"] == str(step / "merged")
    assert "host copy" in manifest["source"]["params"]
    # wandb: training has logged later steps meanwhile, so the numbers join its next step, saying whose they are.
    [(args, kwargs)] = wandb.calls
    assert kwargs == {"commit": False}
    assert args[0]["merge/step"] == 5
    assert "merge/max_rel_err" in args[0]
    assert not list(run.directory.glob(".merged-*"))


def test_orbax_s_commit_marker_in_the_merged_item_is_not_taken_for_a_file_of_the_merge(tmp_path, fixture_params, lora):
    """orbax-checkpoint 0.12 writes `commit_success.txt` into each item directory as it commits the step, after the
    merge's manifest; `verify` knows it by its name and Orbax's text (and still refuses any other extra file)."""
    run = Run(tmp_path / "ckpt", fixture_params)
    run.save(5)
    run.manager.wait_until_finished()
    merged = run.directory / "5" / "merged"
    marker = merged / orbax_compat.COMMIT_MARKER
    if not marker.exists():  # orbax-checkpoint 0.11: written here as 0.12 writes it
        marker.write_text(f"Checkpoint commit was successful to {merged}")
    assert integrity.verify_merged(merged).ok
    marker.write_text("a file of the user's with Orbax's name")
    result = integrity.verify_merged(merged)
    assert not result.ok
    assert "extra file commit_success.txt: not listed in the manifest" in result.problems


def test_async_and_blocking_modes_write_the_same_merged_checkpoint(tmp_path, fixture_params, lora):
    merged = {}
    for mode in ("async", "blocking"):
        run = Run(tmp_path / mode, fixture_params, mode=mode)
        blocked = run.save(5)
        run.manager.wait_until_finished()
        merged[mode] = read_leaves(run.directory / "5" / "merged" / "params")
        assert integrity.verify_merged(run.directory / "5" / "merged").ok
        logging.getLogger(__name__).info("%s: save blocked %.2fs", mode, blocked)
    assert merged["async"].keys() == merged["blocking"].keys()
    for path, want in merged["blocking"].items():
        assert merged["async"][path].dtype == want.dtype
        assert merged["async"][path].tobytes() == want.tobytes(), path


def test_a_save_waits_for_the_previous_merge_says_so_and_merges_one_at_a_time(
    tmp_path, fixture_params, lora, held, caplog
):
    caplog.set_level(logging.INFO, logger="openpi_merge_plugin")
    run = Run(tmp_path / "ckpt", fixture_params)
    run.save(5)
    second = threading.Thread(target=run.save, args=(9,))
    second.start()
    second.join(1.0)
    assert second.is_alive()  # the save of step 9 waits for step 5's merge
    assert "the save of step 9 waits for the merged checkpoint of step 5, still being written" in caplog.text
    held.release()
    second.join(60)
    assert not second.is_alive()
    assert "waited" in caplog.text
    run.manager.wait_until_finished()
    assert held.most == 1
    assert held.started == [5, 9]
    assert _committed(run) == ["5", "9"]  # keep_period=1 keeps both
    for step in (5, 9):
        assert integrity.verify_merged(run.directory / str(step) / "merged").ok


def test_a_failed_async_merge_is_recorded_and_training_goes_on(tmp_path, fixture_params, lora):
    run = Run(tmp_path / "ckpt", fixture_params, tolerance=1e-12)
    run.save(5)
    run.save(9)
    run.manager.wait_until_finished()
    for step in ("5", "9"):
        merged = run.directory / step / "merged"
        assert [p.name for p in merged.iterdir() if not orbax_compat.is_commit_marker(merged, p.name)] == [
            "MERGE_FAILED.json"
        ]
        assert json.loads((merged / "MERGE_FAILED.json").read_text())["error"].startswith("VerificationError")
        assert (run.directory / step / "params").is_dir()


def test_fatal_stops_at_the_next_save_after_the_failed_step_is_committed(tmp_path, fixture_params, lora):
    run = Run(tmp_path / "ckpt", fixture_params, tolerance=1e-12, fatal=True)
    run.save(5)  # returns: the failure is not known yet
    with pytest.raises(VerificationError, match="does not reproduce the LoRA forward"):
        run.save(6)
    assert _committed(run) == ["5"]  # step 6 was not saved
    assert (run.directory / "5" / "merged" / "MERGE_FAILED.json").is_file()


def test_fatal_at_the_last_save_waits_for_its_merge_and_stops(tmp_path, fixture_params, lora):
    run = Run(tmp_path / "ckpt", fixture_params, tolerance=1e-12, fatal=True)
    with pytest.raises(VerificationError):
        run.save(STEPS - 1)
    assert _committed(run) == [str(STEPS - 1)]
    assert (run.directory / str(STEPS - 1) / "merged" / "MERGE_FAILED.json").is_file()


def test_the_host_copy_is_the_saved_params_whatever_the_next_train_step_does():
    params = {"a": jax.device_put(np.arange(1 << 16, dtype=np.float32)), "b": {"c": jax.numpy.ones((8, 8))}}
    want = {"a": np.arange(1 << 16, dtype=np.float32), "b": {"c": np.ones((8, 8), np.float32)}}
    copy = host_copy.take(params)
    params = _train_step(params)
    jax.block_until_ready(params)
    params = _train_step(params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(copy))
    assert jax.tree.all(jax.tree.map(np.array_equal, copy, want))
    assert host_copy.nbytes(copy) == (1 << 16) * 4 + 64 * 4


def test_async_mode_is_refused_on_a_host_that_cannot_hold_the_copy():
    gb = 10**9
    with pytest.raises(options.OptionError) as refused:
        host_copy.check_fits(8 * gb, 6 * gb)
    assert refused.value.option == "merge_lora.mode"
    message = refused.value.as_flag()
    assert message.startswith("--merge-lora.mode async keeps a host copy of the params")
    assert "8 GB plus 1.07 GB for the merge, more than the 6 GB this host has available" in message
    assert message.endswith(
        "use --merge-lora.mode blocking (the merge streams from the live params before each save returns, in about 0.6 GiB of host memory)"
    )
    host_copy.check_fits(8 * gb, 8 * gb + host_copy.MERGE_OVERHEAD_BYTES)
    host_copy.check_fits(8 * gb, None)  # not known: not refused
    assert host_copy.available_bytes() is None or host_copy.available_bytes() > 0
