"""Everything that depends on which orbax-checkpoint is installed, in one place.

Supported: orbax-checkpoint 0.11.13 (openpi 15a9616's pin) up to the newest 0.12.x. The rest of the package uses
Orbax's public API (`PyTreeCheckpointer`, `PyTreeCheckpointHandler`, `type_handlers.ArrayHandler`, `args`,
`metadata`) and, for what that API cannot do, this module: it is the only one that imports `orbax.checkpoint._src`.
Branches are chosen by what the installed Orbax has (an import or attribute that exists or not), never by its version
number; each says which releases take it, as read in the source of 0.11.13, 0.11.20, 0.11.30, 0.11.40, 0.12.0, 0.12.4
and 0.12.8 (the tests run 0.11.13 and the newest).

The internals used, and why (the public API has no equivalent):
- building the TensorStore write spec and ArrayMetadata record of an array exactly as `ArrayHandler` does, and the
  spec of the `_sharding` file, for the streaming writer (`orbax_stream`), which writes a leaf a slice at a time;
- `array_metadata_store.Store`, which writes the per-process `array_metadatas/` records `ArrayHandler` writes;
- `tensorstore_utils.get_ts_context`, the TensorStore context Orbax opens OCDBT checkpoints with, for reading an
  array a layer slice at a time (`sources.SlicedArray`). Its public alias `type_handlers.get_ts_context` logs an
  error on every call in 0.11.x.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging
import pathlib
from typing import Any

import numpy as np

# orbax-checkpoint 0.12 writes this file into every item directory of a step as it commits the step (0.11.x writes
# none), after the item's own files: in merge on save's `<step>/merged/`, after the manifest was written.
COMMIT_MARKER = "commit_success.txt"
_COMMIT_MARKER_TEXT = "Checkpoint commit was successful to "


def is_commit_marker(root: pathlib.Path, rel: str) -> bool:
    """Whether `rel` (a path under the item directory `root`) is the marker Orbax's commit wrote there."""
    if rel != COMMIT_MARKER:
        return False
    try:
        with open(root / rel, "rb") as f:
            return f.read(len(_COMMIT_MARKER_TEXT) + 1).startswith(_COMMIT_MARKER_TEXT.encode())
    except OSError:
        return False


# Notices Orbax logs (through absl, at WARNING) on every read of a single weight, about its own internals: the
# partial-restore API (`transforms={}`, 0.11 and 0.12), and, in 0.12, the ParamInfo its PyTree restore makes for every
# leaf without a TensorStore context (780 lines per merge of the bundled example). Only these are dropped.
_ORBAX_READ_NOTICES = ("The transformations API will eventually be replaced", "created with ts_context=None")


class _DropOrbaxReadNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in _ORBAX_READ_NOTICES)


def quiet_orbax_read_notices() -> None:
    """Installs the filter once on absl's logger (idempotent)."""
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropOrbaxReadNotices) for f in logger.filters):
        logger.addFilter(_DropOrbaxReadNotices())


quiet_orbax_read_notices()


def tree_metadata(directory: pathlib.Path) -> Mapping[str, Any]:
    """The metadata tree of the PyTree checkpoint at `directory` (ArrayMetadata leaves); raises if it cannot be read.

    Asks `PyTreeCheckpointHandler.metadata`, which returns the tree in every release. `PyTreeCheckpointer.metadata`
    returns the same in 0.11.13 and 0.11.20 (what openpi's `restore_params` relies on); from 0.11.30 (at the latest)
    it returns a `StepMetadata` with the tree in `item_metadata`, and turns a read error into `item_metadata=None`
    and a logged warning.
    """
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.metadata(pathlib.Path(directory))
    finally:
        handler.close()


def array_read_spec(
    params_dir: pathlib.Path, name: str, *, use_zarr3: bool, missing_is_error: bool, context: Any
) -> dict[str, Any]:
    """The TensorStore spec Orbax reads array `name` (its '.'-joined key path) of an OCDBT checkpoint with, to be
    opened in `context` (`ts_context()`). `use_zarr3` and `missing_is_error` come from the checkpoint's `_METADATA`
    (`use_zarr3`, `store_array_data_equal_to_fill_value`), as Orbax takes them."""
    import orbax.checkpoint as ocp

    info = ocp.type_handlers.ParamInfo(
        name=name,
        parent_dir=params_dir,
        path=params_dir / name,
        is_ocdbt_checkpoint=True,
        use_zarr3=use_zarr3,
        raise_array_data_missing_error=missing_is_error,
        ts_context=context,  # without it, later releases log a warning per ParamInfo
    )
    return ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=True, raise_array_data_missing_error=missing_is_error)


def ts_context() -> Any:
    """The TensorStore context Orbax reads and writes OCDBT checkpoints with (in the same place in every release)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    return tensorstore_utils.get_ts_context(use_ocdbt=True)


def array_metadata_store() -> Any:
    """What `ArrayHandler` writes its `array_metadatas/` records with (in the same place in every release)."""
    from orbax.checkpoint._src.metadata import array_metadata_store as store

    return store.Store()


def array_write_spec(
    info: Any, *, global_shape: tuple[int, ...], write_shape: tuple[int, ...], dtype: np.dtype, metadata_key: str | None
) -> tuple[dict[str, Any], Any]:
    """(TensorStore spec, ArrayMetadata record) for writing an array in `write_shape` pieces, as `ArrayHandler`
    writes one sharded that way (one chunk per piece); `info` is the ParamInfo Orbax gave the handler."""
    try:  # 0.11.30 (at the latest) and later.
        from orbax.checkpoint._src.serialization.tensorstore_utils import build_array_write_spec as build
    except ImportError:  # 0.11.13 to 0.11.20 (at least).
        from orbax.checkpoint._src.serialization.type_handlers import _build_array_write_spec as build
    from orbax.checkpoint import multihost

    spec = build(
        info,
        global_shape=global_shape,
        local_shape=write_shape,
        dtype=dtype,
        use_ocdbt=info.is_ocdbt_checkpoint,
        # As ArrayHandler: with OCDBT each process writes to its own `ocdbt.process_<i>`, merged on commit.
        process_index=multihost.process_index() if info.is_ocdbt_checkpoint else None,
        metadata_key=metadata_key,
    )
    return spec.json, spec.metadata


def sharding_spec(info: Any) -> dict[str, Any]:
    """The TensorStore spec of this array's entry in the checkpoint's `_sharding` file."""
    try:  # 0.11.30 (at the latest) and later.
        from orbax.checkpoint._src.serialization.tensorstore_utils import get_sharding_tensorstore_spec
    except ImportError:  # 0.11.13 to 0.11.20 (at least).
        from orbax.checkpoint._src.serialization.type_handlers import get_sharding_tensorstore_spec
    return get_sharding_tensorstore_spec(info.parent_dir.as_posix(), info.name)


async def await_path_creation(info: Any) -> None:
    """Waits until the directory `info` names exists. From 0.11.40 (at the latest) Orbax creates it asynchronously and
    a handler must await `ParamInfo.await_path_creation()` before writing there (`info.parent_dir` raises until
    then); up to 0.11.30 (at least) it exists before the handler is called."""
    if hasattr(info, "await_path_creation"):
        await info.await_path_creation()


def os_error_code(message: str) -> int | None:
    """The OS errno that a TensorStore error (Orbax's storage layer) names in its text, if any.

    TensorStore 0.1.74 (openpi's pin) appends "[OS error 27: EFBIG File too large]"; later releases (0.1.86 at the
    latest) "File too large [os_error_code='27']".
    """
    import re

    found = re.search(r"\[OS error (\d+):|\[os_error_code='(\d+)'\]", message)
    return int(found.group(1) or found.group(2)) if found else None
