"""Section `merge_on_save`: openpi's save at full size, without the merged item and with it (async and blocking).

The save path is the training run's: an Orbax CheckpointManager with openpi's items and options (`train_state`,
`params`; `max_to_keep=1`, async), the plugin's `merged` item added by its save hook (`save_hook.save_with_merge`,
what the patched `save_state` calls), the params as jax.Arrays on the device. Measured per save: how long `save`
blocked the loop, the wall time from save start to commit, and the peak host memory above the level before the save
(params resident). Two models, the configurations taking turns:
- pi0's LLM layers (both experts) at `memory_depth` layers. After `save` returns, one train step runs that donates
  the params' buffers (as openpi's does), then the commit is awaited.
- pi0's whole params tree at all 18 layers (3.3e9 params, 7.5 GB: what openpi saves), without the train step: on a
  CPU backend the device memory is the host's, and this machine (24 GiB) cannot hold the params, Orbax's write of
  them (+5.7 GiB) and the train step's new params at once.
"""

from __future__ import annotations

import functools
import pathlib
import shutil
import time
import types
from typing import Any

import numpy as np

from benchmarks import full_size
from benchmarks.config import Args
from benchmarks.layout import experts_for
from benchmarks.layout import layer_layout
from benchmarks.layout import nbytes
from benchmarks.layout import resolved_lora
from benchmarks.timing import HostPeak
from benchmarks.timing import device_stat

# (name, merge mode or None, output dtype) per configuration.
LAYERS_RUNS = (
    ("without", None, None),
    ("async", "async", "float32"),
    # The host copy made a real copy, as on an accelerator host, where it is not the device buffers themselves.
    ("async_real_copy", "async+copy", "float32"),
    ("blocking", "blocking", "float32"),
)
WHOLE_RUNS = (
    ("without", None, None),
    ("async", "async", "float32"),
    ("async_bf16", "async", "bfloat16"),
    ("blocking", "blocking", "float32"),
)


OVERHEAD_REPEATS = 10


def section_merge_on_save(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    experts = experts_for(args)
    resolved = resolved_lora(experts)
    # The merge kernels compile on their first use; here, before any timed save (depth 1: the same slice shapes).
    _measure(_device_params(layer_layout(experts, 1)), resolved, workdir, LAYERS_RUNS[-1:], repeats=1)
    depth = 1 if args.tiny else args.memory_depth
    out: dict[str, Any] = {
        # What the merged item adds to the time a save blocks, many times over: a save blocks for tens of ms on a CPU
        # backend, where a few samples are noise. One layer: the same leaves, and the copy's time does not depend on
        # their size there (the copy is the device buffers themselves).
        "overhead": {
            "depth": 1,
            "train_step": True,
            **_measure(_device_params(layer_layout(experts, 1)), resolved, workdir, LAYERS_RUNS[:2], OVERHEAD_REPEATS),
        },
        "layers": {
            "what": "the tiny LLM layers (--tiny)" if args.tiny else "pi0's LLM layers (both experts)",
            "depth": depth,
            "train_step": True,
            **_measure(_device_params(layer_layout(experts, depth)), resolved, workdir, LAYERS_RUNS, args.repeats),
        },
    }
    # The whole tree openpi saves, at full depth (with --tiny: the tiny layers, two of them, to run the code).
    whole, whole_depth = (layer_layout(experts, 2), 2) if args.tiny else (full_size.training_layout(18), 18)
    out["whole"] = {
        "what": "the tiny LLM layers (--tiny)" if args.tiny else "pi0's whole params tree",
        "depth": whole_depth,
        "train_step": False,
        **_measure(_device_params(whole), resolved, workdir, WHOLE_RUNS, args.repeats, train_step=False),
    }
    return out


def _device_params(layout: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, Any]:
    """Random params as jax.Arrays on the device, nested as openpi's params item (drawn a layer slice at a time)."""
    import jax
    import ml_dtypes  # noqa: F401  (numpy learns the name 'bfloat16')

    from openpi_merge_plugin.checkpoint import sources

    rng = np.random.default_rng(seed)
    flat = {}
    for path, (shape, dtype) in layout.items():
        host = np.empty(shape, dtype)
        for index in np.ndindex(*shape[:1]):
            x = rng.random(shape[1:], dtype=np.float32)
            x -= 0.5
            x *= 0.01 if "lora" in path else 0.04
            host[index] = x
        flat[path] = jax.device_put(host)
        jax.block_until_ready(flat[path])
        del host
    return sources.unflatten(flat)


def _measure(
    params: dict[str, Any], resolved: Any, workdir: pathlib.Path, runs, repeats: int, *, train_step: bool = True
) -> dict[str, Any]:
    """Each configuration `repeats` times, the configurations taking turns; with `train_step`, the params move on by
    one train step after every save, as in training."""
    import jax

    out: dict[str, Any] = {name: {"blocking": [], "wall": [], "host": [], "device": []} for name, _, _ in runs}
    out["params_bytes"] = nbytes(dict(enumerate(jax.tree.leaves(params))))
    holder = [params]
    del params
    for _ in range(repeats):
        for name, mode, dtype in runs:
            blocking, wall, host, device = _save_once(holder, resolved, workdir, mode, dtype, train_step=train_step)
            out[name]["blocking"].append(blocking)
            out[name]["wall"].append(wall)
            out[name]["host"].append(host)
            out[name]["device"].append(device)
    return out


@functools.cache
def _train_step():
    """A train step of openpi's kind: new params, the old buffers donated."""
    import jax

    return jax.jit(lambda p: jax.tree.map(lambda x: (x * 0.5).astype(x.dtype), p), donate_argnums=0)


def _save_once(
    holder: list, resolved: Any, workdir: pathlib.Path, mode: str | None, output_dtype: str | None, *, train_step: bool
):
    import jax
    import orbax.checkpoint as ocp

    from openpi_merge_plugin.openpi_glue import host_copy
    from openpi_merge_plugin.openpi_glue import merged_item
    from openpi_merge_plugin.openpi_glue import save_hook
    from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions

    directory = workdir / "merge_on_save"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    handlers = {"train_state": ocp.PyTreeCheckpointHandler(), "params": ocp.PyTreeCheckpointHandler()}
    if mode is not None:
        handlers[merged_item.ITEM] = merged_item.MergedItemHandler()
    manager = ocp.CheckpointManager(
        directory,
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=False, async_options=ocp.AsyncOptions(timeout_secs=7200)
        ),
    )
    items = {"train_state": {"step": jax.numpy.asarray(1)}, "params": {"params": holder[0]}}
    take = host_copy.take
    if mode == "async+copy":
        host_copy.take = lambda params: jax.tree.map(np.array, take(params))  # np.array copies the views
    device_before = max(device_stat("bytes_in_use") or 0, device_stat("peak_bytes_in_use") or 0)
    with HostPeak() as peak:
        start = time.perf_counter()
        if mode is None:
            manager.save(1, items)
        else:
            options = MergeOnSaveOptions(mode=mode.removesuffix("+copy"), output_dtype=output_dtype)
            config = types.SimpleNamespace(name="benchmark", model=None, merge_lora=options, num_train_steps=2)
            save_hook.save_with_merge(manager, config, 1, lambda m: m.save(1, items), lora=resolved)
        blocking = time.perf_counter() - start
        items = None
        if train_step:
            holder[0] = _train_step()(holder[0])
            jax.block_until_ready(holder[0])
        manager.wait_until_finished()
        wall = time.perf_counter() - start
    host_copy.take = take
    manager.close()
    if mode is not None and not (directory / "1" / merged_item.ITEM / "manifest.json").is_file():
        raise RuntimeError(f"the {mode} merge on save wrote no merged checkpoint")
    shutil.rmtree(directory)
    # Device memory: how far the save raised the device's lifetime peak (None where the backend keeps no statistics,
    # as JAX's CPU backend).
    device_peak = device_stat("peak_bytes_in_use")
    return blocking, wall, peak.extra, None if device_peak is None else max(0, device_peak - device_before)
