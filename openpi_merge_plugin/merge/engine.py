"""The merge engine: for each adapter, merge it into its base weight slice by slice on device, stream to host.

    tree in -> find adapters -> per layer slice: delta from openpi's LoRA equations, merge, verify -> leaves out

Leaves that carry no adapter pass through untouched (same object, same dtype); LoRA leaves are dropped. A merged
weight comes out as a `MergedWeight` that computes its layer slices, piece by piece, when iterated, so a writer can
store each piece before the next one exists (`orbax_stream.save`), or `materialize` it whole (`merge_params`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import dataclasses
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openpi_merge_plugin.checkpoint import orbax_stream
from openpi_merge_plugin.checkpoint import sources as _sources
from openpi_merge_plugin.errors import AdapterError
from openpi_merge_plugin.errors import NonFiniteError
from openpi_merge_plugin.errors import VerificationError
from openpi_merge_plugin.lora import adapters as _adapters
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora.configs import ResolvedLoRA
from openpi_merge_plugin.merge import slice_chunks
from openpi_merge_plugin.merge import slice_ops
from openpi_merge_plugin.merge.report import MergeReport
from openpi_merge_plugin.merge.report import WeightReport
from openpi_merge_plugin.options import MergeOptions

logger = logging.getLogger("openpi_merge_plugin")

# Leaves without adapters are read in groups of about this size (one Orbax restore each).
PASSTHROUGH_BATCH_BYTES = 256 << 20


@dataclasses.dataclass
class MergedWeight:
    """A merged weight, computed one layer slice at a time, in column pieces, when `pieces()` is iterated (once)."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    # Number of leading axes iterated slice by slice (the scanned-layer axis); slices are `weight[index]`.
    lead_ndim: int
    # The base weight's sharding when it was a jax.Array (merge on live training params), else None.
    sharding: jax.sharding.Sharding | None
    # Width of the column pieces along the last axis each slice is merged in (`slice_chunks`), or None: whole slices.
    columns: int | None
    # What it is merged from, how, and where the merge's record and progress go.
    _source: _sources.ParamSource = dataclasses.field(repr=False)
    _adapter: _adapters.Adapter = dataclasses.field(repr=False)
    _options: MergeOptions = dataclasses.field(repr=False)
    _report: MergeReport = dataclasses.field(repr=False)
    _progress: ProgressFn | None = dataclasses.field(repr=False)
    _bounds: list[tuple[int, int]] | None = dataclasses.field(repr=False)  # the column pieces, or None

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead_ndim :]

    def pieces(self) -> Iterator[tuple[orbax_stream.Index, np.ndarray]]:
        """Yields (index, merged piece as a host array) in order: the index into the leading axes, followed by the
        piece's range of the last axis (a `slice`) when merged in columns (`orbax_stream.region` reads it)."""
        return self._pieces(None)

    def materialize(self) -> Any:
        """The whole merged weight: a host array, or a jax.Array with the base's sharding."""
        out = np.empty(self.shape, self.dtype)
        for _ in self._pieces(out):  # each piece lands in `out` itself
            pass
        return out if self.sharding is None else jax.device_put(out, self.sharding)

    def _pieces(self, into: np.ndarray | None) -> Iterator[tuple[orbax_stream.Index, np.ndarray]]:
        """The merge, slice by slice: `merge_weight` in the slice kernel, each slice's checks, its record.

        `into`: None, or the whole output array each piece is also written into (`materialize`).
        """
        adapter, options = self._adapter, self._options
        busy = 0.0  # time spent here, not in the consumer between pieces
        start = time.perf_counter()
        arrays = _sources.AdapterArrays(self._source, adapter)
        record = WeightReport.of(
            adapter,
            options.strength,
            shape=tuple(arrays.w.shape),
            input_dtype=np.dtype(arrays.w.dtype).name,
            output_dtype=self.dtype.name,
        )
        layer_eqns = eq.to_letters(adapter.delta.layer_equation, *adapter.delta.lora_equations)
        factor = jnp.float32(adapter.scale * options.strength)
        for flat_index, index, w, a, b in arrays.slices():
            run = slice_chunks.SliceMerge(
                w,
                a,
                b,
                factor,
                slice_ops.probe_key(options.seed, adapter.base_path, flat_index),
                delta_eqn=adapter.delta.equation,
                layer_eqns=layer_eqns,
                out_dtype=self.dtype,
                verify=options.verify,
                bounds=self._bounds,
            )
            for columns, piece in run:
                at = index if columns is None else (*index, columns)
                if into is not None:
                    into[orbax_stream.region(at)] = piece
                busy += time.perf_counter() - start
                yield at, piece
                start = time.perf_counter()
                del piece
            # A slice's checks need all its pieces, so they run after its pieces went out: a consumer that stores
            # them (a staging directory, `materialize`'s array) discards its work when this raises.
            _check_slice(run.stats, adapter, index, options)
            record.add_slice(run.stats)
            if self._progress is not None:
                self._progress(adapter.base_path, 1)
        record.seconds = busy + time.perf_counter() - start
        self._report.weights.append(record)
        self._report.timings["merge"] = self._report.timings.get("merge", 0.0) + record.seconds
        logger.debug("merged %s in %.3fs", adapter.base_path, record.seconds)


def _check_slice(stats: dict[str, Any], adapter: _adapters.Adapter, index: tuple[int, ...], options: MergeOptions):
    """Refuses a slice with NaN/Inf (unless allowed) or one that does not reproduce the LoRA forward."""
    n_lead = len(index)
    where = f"{adapter.base_path}" + (f" (layer {index[0] if n_lead == 1 else index})" if n_lead else "")
    if not options.allow_nonfinite:
        if not stats["adapters_finite"]:
            raise NonFiniteError(
                f"non-finite values (NaN/Inf) in adapter {adapter.a_path} / {adapter.b_path} at {where}"
            )
        if not stats["merged_finite"]:
            raise NonFiniteError(f"merged weight {where} has non-finite values (NaN/Inf)")
    if options.verify and not stats["rel_err"] <= options.tolerance:
        raise VerificationError(
            f"merged weight {where} does not reproduce the LoRA forward: max relative error "
            f"{stats['rel_err']:.3e} > tolerance {options.tolerance:.1e}"
        )


def materialize(leaf: Any) -> Any:
    """A leaf of `iter_merged` as an array."""
    return leaf.materialize() if isinstance(leaf, MergedWeight) else leaf


@dataclasses.dataclass
class MergeResult:
    params: dict[str, Any]  # nested, as openpi's restore_params returns it
    report: MergeReport


ProgressFn = Callable[[str, int], None]  # (adapter path, slices done in this call)


def plan(tree: Mapping[str, _adapters.ShapeDtype], lora: ResolvedLoRA) -> list[_adapters.Adapter]:
    """Finds every adapter; refuses a tree without any."""
    adapters = _adapters.find_adapters(tree, lora.experts)
    if not adapters:
        raise AdapterError("no LoRA adapters found: nothing to merge (is this a LoRA checkpoint?)")
    return adapters


def iter_merged(
    source: _sources.ParamSource,
    adapters: Sequence[_adapters.Adapter],
    options: MergeOptions,
    report: MergeReport,
    progress: ProgressFn | None = None,
) -> Iterator[tuple[str, Any]]:
    """Yields (path, leaf) of the merged tree in the source's order, reading each weight from `source` when needed.

    Adapted weights come as `MergedWeight`s (nothing is read or computed until their slices are iterated; iterate
    each before asking for the next item); other leaves exactly as the source returns them. `report` is complete
    once the iterator and every MergedWeight are exhausted.
    """
    by_base = {a.base_path: a for a in adapters}
    drop = start_report(report, adapters, options)
    pending: list[str] = []  # passthrough leaves read together, up to PASSTHROUGH_BATCH_BYTES at a time
    pending_bytes = 0
    for path in [*source.tree, None]:
        if path is not None and path not in drop and path not in by_base:
            pending.append(path)
            pending_bytes += _nbytes(source.tree[path])
            if pending_bytes < PASSTHROUGH_BATCH_BYTES:
                continue
        if pending:
            report.passthrough_leaves += len(pending)
            yield from source.read(pending).items()
            pending, pending_bytes = [], 0
        if path in by_base:
            yield path, merged_weight(source, by_base[path], options, report, progress)


def start_report(report: MergeReport, adapters: Sequence[_adapters.Adapter], options: MergeOptions) -> set[str]:
    """Records the merge's settings and the LoRA leaves it drops (returned) in `report`."""
    drop = {p for a in adapters for p in (a.a_path, a.b_path)}
    report.verified = options.verify
    report.tolerance = options.tolerance if options.verify else None
    report.removed_leaves = sorted(drop)
    return drop


def merged_structure(
    tree: Mapping[str, _adapters.ShapeDtype], adapters: Sequence[_adapters.Adapter], options: MergeOptions
) -> dict[str, _adapters.ShapeDtype]:
    """Shape and dtype of every leaf of the merge result."""
    return _adapters.merged_structure(tree, adapters, lambda a: options.dtype_for(tree[a.base_path].dtype))


def write_stream(
    source: _sources.ParamSource,
    adapters: Sequence[_adapters.Adapter],
    options: MergeOptions,
    report: MergeReport,
    progress: ProgressFn | None = None,
) -> tuple[dict[str, _adapters.ShapeDtype], Callable[[], Iterator[orbax_stream.LeafWrite]]]:
    """The merged tree's structure, and a stream of its leaves for `orbax_stream.save` (slices of merged weights)."""
    structure = merged_structure(source.tree, adapters, options)

    def stream() -> Iterator[orbax_stream.LeafWrite]:
        for path, leaf in iter_merged(source, adapters, options, report, progress):
            if isinstance(leaf, MergedWeight):
                yield orbax_stream.LeafWrite(path, leaf.pieces(), leaf.lead_ndim, leaf.columns)
            else:
                yield orbax_stream.whole(path, leaf)

    return structure, stream


def merge_params(
    params: Mapping[str, Any],
    lora: ResolvedLoRA,
    options: MergeOptions | None = None,
    progress: ProgressFn | None = None,
) -> MergeResult:
    """Merges the LoRA adapters of an in-memory params tree (nested dict, as `restore_params` returns it)."""
    options = options or MergeOptions()
    source = _sources.InMemorySource(params)
    adapters = plan(source.tree, lora)
    report = MergeReport()
    flat = {path: materialize(leaf) for path, leaf in iter_merged(source, adapters, options, report, progress)}
    return MergeResult(params=_sources.unflatten(flat), report=report)


def merged_weight(
    source: _sources.ParamSource,
    adapter: _adapters.Adapter,
    options: MergeOptions,
    report: MergeReport,
    progress: ProgressFn | None,
) -> MergedWeight:
    """The merged weight of one adapter; nothing is read or computed until its pieces are iterated."""
    base = source.tree[adapter.base_path]
    out_dtype = np.dtype(options.dtype_for(base.dtype))
    sharding = source.sharding(adapter.base_path)
    lead_ndim = len(adapter.lead_shape)
    bounds = slice_chunks.column_bounds(adapter.delta.layer_equation, tuple(base.shape[lead_ndim:]), sharding)
    return MergedWeight(
        path=adapter.base_path,
        shape=tuple(base.shape),
        dtype=out_dtype,
        lead_ndim=lead_ndim,
        sharding=sharding,
        columns=None if bounds is None else bounds[0][1],
        _source=source,
        _adapter=adapter,
        _options=options,
        _report=report,
        _progress=progress,
        _bounds=bounds,
    )


def _nbytes(sd: _adapters.ShapeDtype) -> int:
    return int(np.prod(sd.shape, dtype=np.int64)) * np.dtype(sd.dtype).itemsize
