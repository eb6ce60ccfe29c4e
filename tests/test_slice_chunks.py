"""Merging a layer slice in column chunks gives the slice's whole merge: same weights, same statistics."""

import json

from helpers import assert_same_merge
from helpers import openpi_jax
import jax
import numpy as np
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import errors
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin import merge_params
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.merge import slice_chunks
from openpi_merge_plugin.merge import slice_ops

GATING = "PaliGemma/llm/layers/mlp/gating_einsum"
# openpi's pinned JAX (0.5.x): there the chunked merge is bitwise the whole-slice merge, as it was always tested.
OPENPI_JAX = openpi_jax()


@pytest.fixture
def kernel_shapes(monkeypatch):
    """Shapes of the base weight of every kernel call."""
    shapes = []
    real = slice_ops.merge_slice

    def recorded(w, *args, **kwargs):
        shapes.append(tuple(w.shape))
        return real(w, *args, **kwargs)

    monkeypatch.setattr(slice_ops, "merge_slice", recorded)
    return shapes


def _chunk_bytes(monkeypatch, n: int) -> None:
    monkeypatch.setitem(slice_chunks.KERNEL_CHUNK_BYTES, "cpu", n)


def test_chunks_split_only_along_an_output_axis_that_is_not_contracted():
    # gating [G, D, F]: F is kept in the output, so the slice splits along it; 3 chunks of at most 2 KiB.
    assert slice_chunks.column_bounds("BTD,GDF->GBTF", (2, 8, 96), max_bytes=2048) == [(0, 32), (32, 64), (64, 96)]
    # Uneven: 7 chunks of at most ceil(96 / 7) = 14 columns, the last one shorter.
    bounds = slice_chunks.column_bounds("BTD,GDF->GBTF", (2, 8, 96), max_bytes=1000)
    assert len(bounds) == 7
    assert (bounds[0], bounds[-1]) == ((0, 14), (84, 96))
    assert slice_chunks.column_bounds("BTD,GDF->GBTF", (2, 8, 96), max_bytes=1 << 20) is None  # small: whole
    # The last weight axis contracted with the input (a layer like `BTF,DF->BTD`): no split.
    assert slice_chunks.column_bounds("BTF,DF->BTD", (64, 4096), max_bytes=1024) is None
    # Sharded (FSDP) weights: whole slices.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp"))
    assert slice_chunks.column_bounds("BTD,GDF->GBTF", (2, 8, 96), sharded, max_bytes=1000) is None


@pytest.mark.parametrize(("chunk_bytes", "output_dtype"), [(1000, "float32"), (3 * 4096, "bfloat16")])
def test_chunked_merge_equals_the_whole_slice_merge(
    fixture_params, fixture_lora, monkeypatch, kernel_shapes, chunk_bytes, output_dtype
):
    options = MergeOptions(output_dtype=output_dtype)
    whole = merge_params(sources.unflatten(fixture_params), fixture_lora, options)
    whole_calls = len(kernel_shapes)
    _chunk_bytes(monkeypatch, chunk_bytes)
    chunked = merge_params(sources.unflatten(fixture_params), fixture_lora, options)

    gating_slice = fixture_params[GATING].shape[1:]
    assert len(kernel_shapes) - whole_calls > whole_calls  # really chunked: more calls than slices
    assert any(s[:-1] == gating_slice[:-1] and s[-1] < gating_slice[-1] for s in kernel_shapes[whole_calls:])

    got, want = sources.flatten(chunked.params), sources.flatten(whole.params)
    assert got.keys() == want.keys()
    for path in want:
        assert_same_merge(got[path], want[path], err_msg=path)
    for g, w in zip(chunked.report.weights, whole.report.weights, strict=True):
        assert g.path == w.path
        np.testing.assert_allclose(g.delta_rel_norm, w.delta_rel_norm, rtol=1e-5, err_msg=g.path)
        np.testing.assert_allclose(g.bf16_survival, w.bf16_survival, rtol=1e-5, err_msg=g.path)
        # The same probe, column by column: the same maxima up to the matmuls' float32 rounding. On newer JAX, errors
        # under 1e-6 (8 float32 eps) are that rounding (JAX 0.12's CPU dots put the whole slice's at up to 7e-7, the
        # chunks' at 1.5e-7); on openpi's JAX they stay within 5% or 2e-7 of each other.
        atol = 2e-7 if OPENPI_JAX else 1e-6
        np.testing.assert_allclose(g.rel_err, w.rel_err, rtol=0.05, atol=atol, err_msg=g.path)
        np.testing.assert_allclose(g.rel_err_stored, w.rel_err_stored, rtol=0.05, atol=atol, err_msg=g.path)
        assert max(g.rel_err) < 1e-5


def test_streamed_checkpoint_is_the_same_when_chunked(step_dir, fixture_lora, fixture_params, monkeypatch):
    _chunk_bytes(monkeypatch, 1000)
    out = merge_checkpoint(step_dir, lora=fixture_lora).output / "params"
    src = sources.OrbaxSource(out)
    got = src.read(src.tree)
    want = sources.flatten(merge_params(sources.unflatten(fixture_params), fixture_lora).params)
    for path in want:
        assert got[path].tobytes() == want[path].tobytes(), path
    # Each piece was written as its own chunk: one layer, the piece's columns.
    layout = json.loads(next((out / "array_metadatas").iterdir()).read_text())["array_metadatas"]
    write_shapes = {m["array_metadata"]["param_name"]: m["array_metadata"]["write_shape"] for m in layout}
    _, gates, width, mlp = fixture_params[GATING].shape
    columns = slice_chunks.column_bounds("BTD,GDF->GBTF", (gates, width, mlp))[0][1]
    assert columns < mlp
    assert write_shapes["params." + GATING.replace("/", ".")] == [1, gates, width, columns]


def test_a_nan_in_a_late_chunk_is_still_caught(fixture_params, fixture_lora, monkeypatch):
    _chunk_bytes(monkeypatch, 1000)
    bad = dict(fixture_params)
    lora_b = bad[GATING + "_lora_b"].copy()
    lora_b[1, -1, 0, -1] = np.inf  # layer 1, last gate, last column: the slice's last chunk
    bad[GATING + "_lora_b"] = lora_b
    with pytest.raises(errors.NonFiniteError, match="gating_einsum_lora_a"):
        merge_params(sources.unflatten(bad), fixture_lora)
    with pytest.raises(errors.VerificationError, match=r"gating_einsum \(layer 1\).*nan"):
        merge_params(sources.unflatten(bad), fixture_lora, MergeOptions(allow_nonfinite=True))
    merged = merge_params(sources.unflatten(bad), fixture_lora, MergeOptions(allow_nonfinite=True, verify=False))
    gating = sources.flatten(merged.params)[GATING]
    assert np.isfinite(gating[0]).all()
    assert not np.isfinite(gating[1, 1, :, -1]).any()
