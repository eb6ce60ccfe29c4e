"""Merge on save: openpi's `save_state` also writes `<step>/merged/`, as an item of openpi's own checkpoint step.

    initialize_checkpoint_dir   the CheckpointManager gets one more item handler, `merged` (MergedItemHandler)
    create_data_loader          remembers the TrainConfig of the run (save_state is not given it); in async mode,
                                first checks that this host can hold the params' host copy (`host_copy.check_run`)
    save_state                  if the run's config has merge_lora_on_save (and this save is wanted), the params
                                openpi saves as `params` (the EMA params when EMA is on) also go to the `merged` item

Being an item of the step, the merged checkpoint is committed, kept and deleted by Orbax together with the LoRA
checkpoint (atomic step finalisation, `max_to_keep`, `keep_period`); restores name their items, so `--resume`
never reads it. In async mode (the default) `save` returns once the params are copied to host, and the merge is
written in the background before Orbax commits the step; a save that comes while the previous merge is still being
written waits for it, as Orbax waits for its own items, and says so in the log. In blocking mode the merge runs
before Orbax's save, and `save_state` returns after both.
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import functools
import logging
import pathlib
import time
from typing import Any
import weakref

from openpi_merge_plugin import openpi_glue
from openpi_merge_plugin.openpi_glue import host_copy
from openpi_merge_plugin.openpi_glue import merged_item

logger = logging.getLogger("openpi_merge_plugin")

_managers: weakref.WeakSet = weakref.WeakSet()  # CheckpointManagers that have the `merged` item
_in_flight: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # manager -> its last async MergeRequest
_checked: set[str] = set()  # runs (config names) whose host memory was checked for async mode
_config_of_loader: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_last_config: list[Any] = []  # fallback when a loader cannot be weakly referenced


def patch_data_loader(module: Any) -> None:
    original = module.create_data_loader

    @functools.wraps(original)
    def create_data_loader(config: Any, *args: Any, **kwargs: Any) -> Any:
        _check_host_memory(config)  # before the loader, the model and any training step
        loader = original(config, *args, **kwargs)
        with contextlib.suppress(TypeError):  # a loader that cannot be weakly referenced: see _last_config
            _config_of_loader[loader] = config
        _last_config[:] = [config]
        return loader

    module.create_data_loader = create_data_loader


def patch_checkpoints(module: Any) -> None:
    missing = [n for n in ("initialize_checkpoint_dir", "save_state", "ocp") if not hasattr(module, n)]
    if missing:
        openpi_glue.inactive(f"openpi.training.checkpoints has no {', '.join(missing)}; merge on save is off")
        return
    initialize, save_state = module.initialize_checkpoint_dir, module.save_state

    @functools.wraps(initialize)
    def initialize_checkpoint_dir(*args: Any, **kwargs: Any) -> Any:
        real_ocp = module.ocp
        module.ocp = _OcpWithMergedItem(real_ocp, merged_item.MergedItemHandler)
        try:
            result = initialize(*args, **kwargs)
        finally:
            module.ocp = real_ocp
        manager = result[0] if isinstance(result, tuple) else result
        _managers.add(manager)
        merged_item.remove_stale_staging(pathlib.Path(str(manager.directory)))
        return result

    @functools.wraps(save_state)
    def save_state_and_merge(checkpoint_manager: Any, state: Any, data_loader: Any, step: int, *args, **kwargs):
        config = _config_for(data_loader)
        if checkpoint_manager in _managers:
            wait_for_previous_merge(checkpoint_manager, step)
        if not _wanted(config, step):
            return save_state(checkpoint_manager, state, data_loader, step, *args, **kwargs)
        if checkpoint_manager not in _managers:
            openpi_glue.inactive(
                "the checkpoint manager was not made by openpi's initialize_checkpoint_dir; step saved without merge"
            )
            return save_state(checkpoint_manager, state, data_loader, step, *args, **kwargs)
        return save_with_merge(
            checkpoint_manager,
            config,
            step,
            lambda manager: save_state(manager, state, data_loader, step, *args, **kwargs),
            last=step == config.num_train_steps - 1,
        )

    module.initialize_checkpoint_dir = initialize_checkpoint_dir
    module.save_state = save_state_and_merge


def save_with_merge(
    checkpoint_manager: Any, config: Any, step: int, save: Callable[[Any], Any], *, last: bool = False, lora: Any = None
) -> Any:
    """Runs `save(manager)` (openpi's save_state) with a manager whose `save` also saves the `merged` item.

    `last`: no save follows (the end of training), so a failed async merge with `merge_lora.fatal` is waited for and
    raised here. `lora`: the ResolvedLoRA to merge with, instead of the one of `config.model`.
    """
    proxy = _ManagerAddingMergedItem(checkpoint_manager, config, lora)
    try:
        result = save(proxy)
    finally:
        if proxy.request is not None:
            proxy.request.released.set()  # Orbax's synchronous part is over: the async merge may start
    request = proxy.request
    if request is not None and request.scheduled:
        _in_flight[checkpoint_manager] = request
        if last and config.merge_lora.fatal:
            wait_for_previous_merge(checkpoint_manager, step, next_save=False)
    elif request is not None and request.outcome.error is not None and config.merge_lora.fatal:
        checkpoint_manager.wait_until_finished()  # the LoRA step is committed before training stops
        raise request.outcome.error
    return result


def wait_for_previous_merge(checkpoint_manager: Any, step: int, *, next_save: bool = True) -> None:
    """Waits for the async merge still being written for `checkpoint_manager`, if any, and says so; with
    `merge_lora.fatal`, raises its error once its step is committed. `step`: the save that waits (`next_save`) or
    the step of the merge waited for."""
    request = _in_flight.pop(checkpoint_manager, None)
    if request is None:
        return
    if not request.done.is_set():
        start = time.perf_counter()
        if next_save:
            logger.info(
                "openpi-merge-plugin: the save of step %d waits for the merged checkpoint of step %d, still being "
                "written (as Orbax waits for its own items before the next save)",
                step,
                request.step,
            )
        request.done.wait()
        logger.info(
            "openpi-merge-plugin: waited %.1fs for the merged checkpoint of step %d",
            time.perf_counter() - start,
            request.step,
        )
    if request.outcome.error is not None and request.config.merge_lora.fatal:
        checkpoint_manager.wait_until_finished()  # the LoRA step is committed before training stops
        raise request.outcome.error


def _check_host_memory(config: Any) -> None:
    if not getattr(config, "merge_lora_on_save", False) or config.merge_lora.mode != "async":
        return
    key = f"{config.name}/{getattr(config, 'exp_name', '')}"
    if key not in _checked:
        host_copy.check_run(config)
        _checked.add(key)


def _config_for(data_loader: Any) -> Any | None:
    try:
        config = _config_of_loader.get(data_loader)
    except TypeError:
        config = None
    return config if config is not None else (_last_config[0] if _last_config else None)


def _wanted(config: Any, step: int) -> bool:
    if config is None or not getattr(config, "merge_lora_on_save", False):
        return False
    if config.merge_lora.when == "final":
        return step == config.num_train_steps - 1  # the step scripts/train.py saves last
    return True


class _OcpWithMergedItem:
    """orbax.checkpoint as seen by openpi's initialize_checkpoint_dir: its CheckpointManager gets the merged item."""

    def __init__(self, ocp: Any, handler_cls: Callable[[], Any]):
        self._ocp = ocp
        self._handler_cls = handler_cls

    def CheckpointManager(self, *args: Any, item_handlers: Any = None, **kwargs: Any) -> Any:  # noqa: N802
        if isinstance(item_handlers, dict) and merged_item.ITEM not in item_handlers:
            item_handlers = {**item_handlers, merged_item.ITEM: self._handler_cls()}
        else:
            openpi_glue.inactive("openpi's CheckpointManager has no item_handlers dict; merge on save is off")
        return self._ocp.CheckpointManager(*args, item_handlers=item_handlers, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ocp, name)


class _ManagerAddingMergedItem:
    """A CheckpointManager whose `save(step, items)` also saves the `merged` item from the `params` item."""

    def __init__(self, manager: Any, config: Any, lora: Any = None):
        self._manager = manager
        self._config = config
        self._lora = lora
        self.request: merged_item.MergeRequest | None = None

    def save(self, step: int, items: Any = None, *args: Any, **kwargs: Any) -> Any:
        params = items.get("params", {}).get("params") if isinstance(items, dict) else None
        if params is None:
            openpi_glue.inactive("openpi's save_state no longer saves a {'params': {'params': ...}} item; no merge")
            return self._manager.save(step, items, *args, **kwargs)
        request = merged_item.MergeRequest(
            params=params,
            save_assets=items.get("assets"),
            config=self._config,
            step=step,
            step_dir=pathlib.Path(str(self._manager.directory)) / str(step),
            lora=self._lora,
        )
        self.request = request
        if request.mode == "blocking":
            request.staging = merged_item.write_staged(request)  # before Orbax's save: see merged_item
        return self._manager.save(step, {**items, merged_item.ITEM: request}, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)
