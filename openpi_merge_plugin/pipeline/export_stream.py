"""The export's one pass: every JAX leaf of a source read once, a layer slice at a time, merged on the way where it
carries a LoRA adapter (the merge engine, verification included), laid out as the tensors of the file and written,
each at its offset and hashed (`write`); then everything read back against those hashes (`read_back`).

`laid_out_tensors` yields (spec, rows, array) in the source's order, not the file's: a writer that knows the header
up front (`safetensors_stream.PositionalWriter`) puts each tensor at its offset. A format whose tensors are
PI0Pytorch's, renamed or recast (LeRobot), consumes the same stream. Without adapters (a merged directory, a plain
checkpoint) the merge is the identity: the leaves are read and laid out as they are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
import dataclasses
import hashlib
import pathlib
from typing import Any

import numpy as np

from openpi_merge_plugin.checkpoint import host_memory
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import safetensors_stream
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.errors import CheckpointError
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.merge.report import MergeReport

# A tensor laid out without transposes (the embedding, 2.1 GB in float32) goes out in row blocks of this size.
BLOCK_BYTES = 256 << 20

LaidOut = tuple[layout.TensorSpec, slice | None, np.ndarray | None]  # spec, rows of axis 0 (None: all), None: zeros
ProgressFn = Callable[[str, int, int], None]


@dataclasses.dataclass
class Merge:
    """The merge done on the way: a LoRA step's adapters, the options, and where its record and progress go."""

    adapters: list[_adapters.Adapter]
    options: engine.MergeOptions
    report: MergeReport = dataclasses.field(default_factory=MergeReport)
    progress: engine.ProgressFn | None = None


def laid_out_tensors(
    source: sources.ParamSource, plan: Any, merge: Merge | None = None, *, block_bytes: int | None = None
) -> Iterator[LaidOut]:
    """Each tensor of `plan` (a `FormatPlan`: its `.tensors`), laid out from `source` (merged per slice with `merge`;
    None: the identity), once.

    Holds one layer slice of one leaf at a time (a merged slice as the engine hands it over, assembled from its
    column pieces); a large tensor without transposes comes in row blocks (`rows`), each laid out on its own.
    """
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    specs: dict[tuple[str | None, int | None], list[layout.TensorSpec]] = defaultdict(list)
    scanned = set()
    for spec in plan.tensors:
        specs[spec.recipe.source, spec.recipe.layer].append(spec)
        if spec.recipe.layer is not None:
            scanned.add(spec.recipe.source)
    for spec in specs.pop((None, None), []):
        yield spec, None, None
    for path, layer, array in _leaf_slices(source, {s for s, _ in specs}, scanned, merge):
        for spec in specs.pop((path, layer), []):
            yield from _lay_out(spec, array, block_bytes)
    if specs:
        raise CheckpointError(f"the source has no {min(specs, key=str)} (source path, layer) the layout needs")


def _lay_out(spec: layout.TensorSpec, array: Any, block_bytes: int) -> Iterator[LaidOut]:
    recipe = spec.recipe
    rows = spec.shape[0] if spec.shape else 0
    if recipe.layer is None and recipe.split is None and not recipe.ops and rows and spec.nbytes > block_bytes:
        step = max(1, block_bytes // (spec.nbytes // rows))
        for start in range(0, rows, step):
            block = np.asarray(array[start : min(start + step, rows)])  # TensorStore does not clip a range
            part = dataclasses.replace(recipe, source_shape=block.shape, shape=block.shape)
            yield spec, slice(start, start + len(block)), layout.apply(part, block)
            del block
        return
    if isinstance(array, sources.SlicedArray):
        array = array[()]
    yield spec, None, layout.apply(recipe, array)


def _leaf_slices(
    source: sources.ParamSource, paths: set[str], scanned: set[str], merge: Merge | None
) -> Iterator[tuple[str, int | None, Any]]:
    """(path, layer or None, array) of each leaf in `paths`, in the source's order: merged weights a merged slice at
    a time, other scanned leaves a layer at a time, the rest whole (an unread `SlicedArray` where the source has
    one, so that a large leaf can be read in row blocks)."""
    adapters = merge.adapters if merge is not None else []
    by_base = {a.base_path: a for a in adapters}
    if merge is not None:
        engine.start_report(merge.report, adapters, merge.options)
    for path in source.tree:
        if path not in paths:
            continue
        host_memory.release_freed()  # what the last leaf's reads and writes freed, before this one is read
        if path in by_base:
            weight = engine.merged_weight(source, by_base[path], merge.options, merge.report, merge.progress)
            yield from ((path, layer, a) for layer, a in _merged_slices(weight))
            continue
        if merge is not None:
            merge.report.passthrough_leaves += 1
        leaf = source.sliced(path)
        if path in scanned:
            for layer in range(source.tree[path].shape[0]):
                yield path, layer, np.asarray(leaf[(layer,)])
        else:
            yield path, None, leaf
        del leaf


def _merged_slices(weight: engine.MergedWeight) -> Iterator[tuple[int | None, np.ndarray]]:
    """(layer or None, merged slice) of a merged weight, each after the engine checked it (its checks run when the
    next piece is asked for)."""
    if weight.lead_ndim > 1:
        raise CheckpointError(f"{weight.path}: adapters over {weight.lead_ndim} leading axes have no export layout")
    current, buffer = None, None
    for at, piece in weight.pieces():
        index, columns = (at[:-1], at[-1]) if at and isinstance(at[-1], slice) else (at, None)
        if index != current:
            if current is not None:
                yield (current[0] if current else None), buffer
            current = index
            buffer = piece if columns is None else np.empty(weight.slice_shape, weight.dtype)
        if columns is not None:
            buffer[..., columns] = piece
        del piece
    if current is not None:
        yield (current[0] if current else None), buffer


@dataclasses.dataclass(frozen=True)
class Written:
    """What `write` wrote, as it wrote it: the model file's header and each tensor's sha256, each side file's, and
    the verification of the merge on the way (None: the identity)."""

    header: bytes
    digests: dict[str, str]
    files: dict[str, str]
    merge: dict[str, Any] | None = None


def disk_needed(plan: Any, output: pathlib.Path) -> int:
    """An upper bound of the disk space `plan` takes at `output`, checked before the pass with the copies it makes:
    no link in them leads into the output's own directory (which would copy without end)."""
    for tree in plan.copies.values():
        _output.check_copy(tree, output.parent)
    return _output.disk_bytes(
        [sum(t.nbytes for t in plan.tensors), *(len(data) for data in plan.files.values())],
        copied=list(plan.copies.values()),
    )


def write(
    directory: pathlib.Path,
    plan: Any,
    source: sources.ParamSource,
    merge: Merge | None,
    progress: ProgressFn | None = None,
) -> Written:
    """The one pass: each leaf read once (merged on the way), laid out, written at its offset and hashed, into
    `directory / plan.model_file`; then the plan's side files and copies (`formats.base.FormatPlan`)."""
    done = 0
    writer = safetensors_stream.PositionalWriter(directory / plan.model_file, plan.tensors, plan.metadata)
    with writer, safetensors_stream.InBackground() as background:
        for spec, rows, array in laid_out_tensors(source, plan, merge):
            if array is None:
                background.submit(writer.write_zeros, spec.name)
            else:
                background.submit(writer.write, spec.name, array, rows)
            del array
            if progress is not None and (rows is None or rows.stop == spec.shape[0]):
                done += 1
                progress("export", done, len(plan.tensors))
    for name, data in plan.files.items():
        (directory / name).write_bytes(data)
    for name, tree in plan.copies.items():
        _output.copy_assets(tree, directory / name)
    files = {name: hashlib.sha256(data).hexdigest() for name, data in plan.files.items()}
    checked = None if merge is None else {"verified": merge.report.verified, "max_rel_err": merge.report.max_rel_err}
    return Written(writer.header, dict(writer.digests), files, checked)


def read_back(
    directory: pathlib.Path, plan: Any, written: Written, source: sources.ParamSource
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model file read back once against its hashes (`safetensors_stream.read_back`), and each side file; then
    the format's own check of what it wrote (`plan.check`, with the source's reader). Returns the manifest's record,
    the model file's checksum entry (not hashed again) and the format's check's verification entries."""
    path = directory / plan.model_file
    readback = safetensors_stream.read_back(path, written.digests, written.header)
    for name, digest in written.files.items():
        if hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest:
            raise CheckpointError(f"{directory / name} does not read back as written")
    record = {
        "reader": "safetensors.safe_open (header) and os.preadv (bytes at the header's offsets)",
        "tensors_checked": readback.tensors_checked,
        "bitwise": True,
        "check": (
            "safe_open reports every tensor's name, dtype and shape as written; sha256 of each tensor's bytes as "
            "written == as read at its offsets; each tensor's first and last rows as safe_open reads them == "
            "those bytes"
        ),
        "files_checked": sorted(written.files),
    }
    checked = dict(plan.check(directory, source)) if plan.check is not None else {}
    return record, {path.name: {"sha256": readback.file_sha256, "bytes": readback.bytes}}, checked
