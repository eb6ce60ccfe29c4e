"""The floor: a plain dtype-converting copy of the adapted weights, in memory and on disk (the merge's I/O)."""

from __future__ import annotations

import pathlib

import numpy as np

from benchmarks.device_ops import _convert
from benchmarks.inputs import MergeInputs


def floor_numpy(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """The plain copy: every adapted base weight (host, bf16) converted to the output dtype."""
    return {a.base_path: inputs.flat[a.base_path].astype(out_dtype) for a in inputs.adapters}


def floor_device(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """What the engine moves, without its math: per layer slice, host -> device, astype, device -> host."""
    convert = _convert(out_dtype)
    out = {}
    for a in inputs.adapters:
        w = inputs.flat[a.base_path]
        merged = np.empty(w.shape, out_dtype)
        for index in np.ndindex(*a.lead_shape):
            merged[index] = np.asarray(convert(w[index]))
        out[a.base_path] = merged
    return out


def floor_disk(step: pathlib.Path, out: pathlib.Path, inputs: MergeInputs, out_dtype: str) -> None:
    """The same I/O as `merge_checkpoint` without the math: read each weight and its adapters with Orbax, convert,
    stream to Orbax in the engine's column pieces, checksum the files (manifest), fsync and commit; other leaves
    passed through.
    """
    from openpi_merge_plugin.checkpoint import orbax_stream
    from openpi_merge_plugin.checkpoint import output
    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.lora import adapters as _adapters
    from openpi_merge_plugin.merge import slice_chunks

    source = sources.OrbaxSource(step / "params")
    by_base = {a.base_path: a for a in inputs.adapters}
    drop = {p for a in inputs.adapters for p in (a.a_path, a.b_path)}
    structure = _adapters.merged_structure(source.tree, inputs.adapters, lambda _: out_dtype)

    def stream():
        pending = []
        for path in [*source.tree, None]:
            if path is not None and path not in drop and path not in by_base:
                pending.append(path)
                continue
            if pending:
                yield from (orbax_stream.whole(p, v) for p, v in source.read(pending).items())
                pending = []
            if path in by_base:
                a = by_base[path]
                w = source.read([a.base_path, a.a_path, a.b_path])[a.base_path]
                lead = len(a.lead_shape)
                bounds = slice_chunks.column_bounds(a.delta.layer_equation, w.shape[lead:])
                if bounds is None:  # written in the same pieces as the engine writes
                    pieces = ((index, w[index].astype(out_dtype)) for index in np.ndindex(*a.lead_shape))
                else:
                    pieces = (
                        ((*index, cols), w[index][..., cols].astype(out_dtype))
                        for index in np.ndindex(*a.lead_shape)
                        for cols in (slice(*b) for b in bounds)
                    )
                yield orbax_stream.LeafWrite(path, pieces, lead, None if bounds is None else bounds[0][1])

    with output.staged_directory(out, overwrite=True) as tmp:
        orbax_stream.save(tmp / "params", structure, stream)
        output.write_manifest(tmp, {})
