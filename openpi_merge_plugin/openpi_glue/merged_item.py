"""The `merged` item of an openpi checkpoint step: an Orbax CheckpointHandler that merges the live params.

Its directory, `<step>/merged/`, is laid out exactly like the offline command's output (`params/`, `assets/`,
`manifest.json`, written by the same pipeline, `checkpoint_merge.plan_merge` and `write_merge`). If the merge fails, training goes on (unless
`merge_lora.fatal`): the error is logged with its traceback and the directory holds only `MERGE_FAILED.json`.

The next train step donates the params' buffers, so the merge cannot read them after `save` returns. Two modes
(`merge_lora.mode`):
- async (the default): the item's save copies the params to host memory (`host_copy.take`, as Orbax copies the
  `params` item) and returns; the merge and its write run in the item's commit future, in the background, and Orbax
  commits the step only when every item's commit is over.
- blocking: the merge reads the live params before Orbax's save starts (`save_hook` calls `write_staged`), and
  training waits for it.

Either way the merge streams into a staging directory next to the steps (`<checkpoint_dir>/.merged-<step>.tmp-*`),
and the commit moves its contents into the item directory: a rename on the same file system. Staging directories
of runs that died are removed when the checkpoint manager is created.

The merge writes `params/` with an Orbax `Checkpointer` of its own, which advances Orbax's process-wide operation id
(the key under which a save's handlers wait for its directories). It therefore never runs while an Orbax save is in
its synchronous part, where the handlers read that id: before the save (blocking), or once it has returned
(async: `MergeRequest.released`). Run inside it, a `params` item could write before its directory existed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
import dataclasses
import datetime as dt
import json
import logging
import pathlib
import re
import shutil
import sys
import threading
import time
import traceback
from typing import Any
import uuid

import orbax.checkpoint as ocp
import orbax.checkpoint.future as future

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.openpi_glue import host_copy
from openpi_merge_plugin.serving.names import ServingConfig

logger = logging.getLogger("openpi_merge_plugin")

FAILURE_MARKER = _output.FAILURE_MARKER
ITEM = "merged"  # the item name, and so the directory name in each step
PYTORCH_ITEM = "merged_pytorch"  # written next to it, with merge_lora.export_pytorch
LEROBOT_ITEM = "merged_lerobot"  # and with merge_lora.export_lerobot
PEFT_ITEM = "lerobot_peft"  # and with merge_lora.export_lerobot_peft (the step's adapters, not its merge)
# Exports sit inside the staging directory under these names until the step is committed.
_STAGED_EXPORTS = {".pytorch": PYTORCH_ITEM, ".lerobot": LEROBOT_ITEM, ".lerobot_peft": PEFT_ITEM}


@dataclasses.dataclass
class Outcome:
    error: BaseException | None = None
    manifest: dict[str, Any] | None = None


@dataclasses.dataclass
class MergeRequest:
    params: Any  # what openpi saves as `params` (nnx.State of jax.Arrays, sharded as in training); async: host copy
    save_assets: Callable[[Any], None] | None  # openpi's own assets callback for this step
    config: Any  # the run's TrainConfig
    step: int
    step_dir: pathlib.Path  # where Orbax will commit the step
    outcome: Outcome = dataclasses.field(default_factory=Outcome)
    # The LoRA config to merge with (a ResolvedLoRA); None: the one of the config's model.
    lora: Any = None
    # Blocking mode: the staging directory the merge was written to before Orbax's save (None off process 0).
    staging: pathlib.Path | None = None
    # Async mode: set by the save once Orbax's synchronous part is over; the merge starts then.
    released: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    # Async mode: set when the merge and its move into the step are over; `scheduled` says one was started.
    done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    scheduled: bool = False

    @property
    def mode(self) -> str:
        return self.config.merge_lora.mode


STAGING_GLOB = ".merged-*.tmp-*"
STAGING_NAME = re.compile(r"\.merged-\d+\.tmp-[0-9a-f]{12}")  # what write_staged names them, nothing else


class MergedItemHandler(ocp.AsyncCheckpointHandler):
    """Writes the merged checkpoint of a step; only for saving (openpi never restores this item)."""

    def save(self, directory: Any, args: MergedSave) -> None:
        request = args.request
        staging = request.staging if request.mode == "blocking" else write_staged(request)
        if staging is not None:
            move_into(staging, pathlib.Path(str(directory)))

    async def async_save(self, directory: Any, args: MergedSave) -> list:
        request, directory = args.request, pathlib.Path(str(directory))
        if request.mode == "async":
            return _start_in_background(request, directory)
        if request.staging is None:
            return []
        return [
            future.CommitFutureAwaitingContractedSignals(
                asyncio.to_thread(move_into, request.staging, directory), name="merged_item"
            )
        ]

    def restore(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the merged item is not restored with the train state; serve it instead")


@ocp.args.register_with_handler(MergedItemHandler, for_save=True)
@dataclasses.dataclass
class MergedSave(ocp.args.CheckpointArgs):
    request: MergeRequest


@ocp.args.register_with_handler(MergedItemHandler, for_restore=True)
class MergedRestore(ocp.args.CheckpointArgs): ...


def _start_in_background(request: MergeRequest, directory: pathlib.Path) -> list:
    """Copies the params to host (the part of the save training waits for) and returns the commit that merges."""
    import jax

    if jax.process_index() != 0:
        return []
    start = time.perf_counter()
    request.params = host_copy.take(request.params)
    request.scheduled = True
    logger.info(
        "Merging the LoRA adapters of step %d in the background: host copy of the params %.2f GB, taken in %.2fs",
        request.step,
        host_copy.nbytes(request.params) / 1e9,
        time.perf_counter() - start,
    )
    return [future.CommitFutureAwaitingContractedSignals(_merge_and_move(request, directory), name="merged_item")]


async def _merge_and_move(request: MergeRequest, directory: pathlib.Path) -> None:
    """The async mode's commit: merge the host copy into a staging directory, then move it into the item."""
    try:
        await asyncio.to_thread(request.released.wait)
        staging = await asyncio.to_thread(write_staged, request)
        request.params = None  # the host copy goes once merged
        await asyncio.to_thread(move_into, staging, directory)
    finally:
        request.params = None
        request.done.set()


def write_staged(request: MergeRequest) -> pathlib.Path | None:
    """Merges `request.params` into a new staging directory (or records the failure there); None off process 0."""
    import jax

    if jax.process_index() != 0:
        return None
    directory = request.step_dir.parent / f".merged-{request.step}.tmp-{uuid.uuid4().hex[:12]}"
    directory.mkdir()
    options = request.config.merge_lora
    start = time.perf_counter()
    try:
        manifest = _merge(directory, request)
    except Exception as e:
        request.outcome.error = e
        logger.error(
            "openpi-merge-plugin: merging the LoRA adapters of step %d FAILED; the LoRA checkpoint is saved, "
            "training continues%s. Reason: %s\n%s",
            request.step,
            "" if not options.fatal else " until it is committed, then stops (merge_lora.fatal)",
            e,
            traceback.format_exc(),
        )
        for child in directory.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        marker = {
            "step": request.step,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        (directory / FAILURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return directory
    request.outcome.manifest = manifest
    _report(request, manifest, time.perf_counter() - start)
    if options.export_pytorch:
        _export(directory, request, ".pytorch", "PyTorch", _write_pytorch)
    if options.export_lerobot:
        _export(directory, request, ".lerobot", "LeRobot", _write_lerobot)
    if options.export_lerobot_peft:
        _export(directory, request, ".lerobot_peft", "LeRobot PEFT", _write_lerobot_peft)
    return directory


def _write_pytorch(target: pathlib.Path, directory: pathlib.Path, request: MergeRequest) -> dict[str, Any]:
    return _write_export(target, directory, request, "pytorch", PYTORCH_ITEM)


def _write_lerobot(target: pathlib.Path, directory: pathlib.Path, request: MergeRequest) -> dict[str, Any]:
    return _write_export(target, directory, request, "lerobot", LEROBOT_ITEM)


def _write_export(
    target: pathlib.Path, directory: pathlib.Path, request: MergeRequest, fmt: str, item: str
) -> dict[str, Any]:
    from openpi_merge_plugin.formats.base import ExportOptions
    from openpi_merge_plugin.pipeline import export

    return export.write_beside_merge(
        target,
        directory,
        fmt,
        request.config,
        ExportOptions(precision=request.config.merge_lora.export_precision),
        request.step_dir / item,
        source_info={"merged": str(request.step_dir / ITEM), "merged_on_the_way": False},
    )


def _write_lerobot_peft(target: pathlib.Path, directory: pathlib.Path, request: MergeRequest) -> dict[str, Any]:
    """The step's own adapters (the params the merge just read), as a PEFT adapter on merge_lora.export_base."""
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.formats.base import ExportOptions
    from openpi_merge_plugin.pipeline import export

    opts = request.config.merge_lora
    params = sources.pure_dict(request.params)
    return export.write_beside_merge(
        target,
        directory,
        "lerobot-peft",
        request.config,
        ExportOptions(precision=opts.export_precision, base=opts.export_base, base_revision=opts.export_base_revision),
        request.step_dir / PEFT_ITEM,
        source_info={"lora_step": str(request.step_dir), "params": "the params item of this step"},
        params=sources.InMemorySource(params),
    )


def _export(directory: pathlib.Path, request: MergeRequest, staged: str, what: str, write: Callable) -> None:
    """One export of the merge just staged, staged beside it; a failure is logged and recorded, training goes on."""
    target = directory / staged
    target.mkdir()
    try:
        start = time.perf_counter()
        manifest = write(target, directory, request)
        logger.info(
            "Exported the merged step %d for %s (%d tensors, %s) in %.1fs",
            request.step,
            what,
            manifest["tensors"],
            manifest["precision"],
            time.perf_counter() - start,
        )
    except Exception as e:
        logger.error("openpi-merge-plugin: the %s export of step %d FAILED: %s", what, request.step, e)
        for child in target.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        marker = {"step": request.step, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (target / FAILURE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def move_into(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Moves everything in `staging` into `directory` (made by Orbax), then removes `staging`."""
    directory.mkdir(parents=True, exist_ok=True)
    for child in staging.iterdir():
        export = _STAGED_EXPORTS.get(child.name)
        child.rename(directory.parent / export if export else directory / child.name)
    staging.rmdir()


def remove_stale_staging(checkpoint_dir: pathlib.Path) -> None:
    """Staging directories of merges whose step was never committed (the process died)."""
    for stale in checkpoint_dir.glob(STAGING_GLOB):
        if STAGING_NAME.fullmatch(stale.name) and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)


def _merge(directory: pathlib.Path, request: MergeRequest) -> dict[str, Any]:
    """The live params through the one pipeline (`plan_merge`, `write_merge`), as the offline merge does."""
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.lora import openpi_configs
    from openpi_merge_plugin.pipeline import checkpoint_merge

    config, opts = request.config, request.config.merge_lora
    params = sources.pure_dict(request.params)
    lora = request.lora or openpi_configs.lora_from_model(config.model, config_name=config.name)
    merged_from = (
        "a host copy of the live train state, taken by the save" if request.mode == "async" else "the live train state"
    )
    plan = checkpoint_merge.plan_merge(
        sources.InMemorySource(params),
        lora,
        opts.merge_options(),
        source_info={
            "step_dir": str(request.step_dir),
            "step": request.step,
            "params": f"the params item of this step (merged from {merged_from})",
            "train_config": config.name,
        },
        save_assets=request.save_assets,
        run_config=config,
    )
    manifest, _ = checkpoint_merge.write_merge(
        directory, plan, request.step_dir / ITEM, host_buffer_bytes=opts.host_buffer_mib << 20
    )
    return manifest


def _report(request: MergeRequest, manifest: dict[str, Any], seconds: float) -> None:
    weights = manifest["weights"]
    ratios = [r for w in weights for r in w["delta_rel_norm"]]
    numbers = {
        "merge/seconds": seconds,
        "merge/max_rel_err": manifest["max_rel_err"] if manifest["max_rel_err"] is not None else float("nan"),
        "merge/delta_rel_norm_max": max(ratios) if ratios else 0.0,
        "merge/delta_rel_norm_mean": sum(ratios) / len(ratios) if ratios else 0.0,
        "merge/weights": len(weights),
    }
    logger.info(
        "Merged the LoRA adapters of step %d into %s in %.1fs: %d weights, max relative error %.1e, "
        "||dW||/||W|| up to %.2e (%s)",
        request.step,
        manifest["output"],
        seconds,
        len(weights),
        numbers["merge/max_rel_err"],
        numbers["merge/delta_rel_norm_max"],
        ServingConfig(manifest["serving_config"], manifest["serving_config_reason"]).describe(),
    )
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        if request.mode == "async":
            # Training has gone on meanwhile, and wandb drops a step older than its last: the numbers join the next
            # step training logs, with the step they belong to.
            wandb.log({**numbers, "merge/step": request.step}, commit=False)
        else:
            wandb.log(numbers, step=request.step)
