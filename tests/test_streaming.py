"""The streamed write (one layer slice at a time) against Orbax's own whole-tree save of the same merge."""

import json
import pathlib

from helpers import FIXTURE_STEP
from helpers import read_leaves
import numpy as np
import orbax.checkpoint as ocp
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin.checkpoint import orbax_compat
from openpi_merge_plugin.checkpoint import orbax_stream
from openpi_merge_plugin.checkpoint import params_io
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.merge import engine


def _value_types(params_dir: pathlib.Path) -> dict[str, str]:
    tree = json.loads((params_dir / "_METADATA").read_text())["tree_metadata"]
    return {key: entry["value_metadata"]["value_type"] for key, entry in tree.items()}


@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_streamed_checkpoint_equals_whole_tree_save_bitwise(step_dir, fixture_lora, fixture_params, output_dtype):
    options = MergeOptions(output_dtype=output_dtype)
    streamed = merge_checkpoint(step_dir, lora=fixture_lora, options=options).output / "params"
    in_memory = engine.merge_params(sources.unflatten(fixture_params), fixture_lora, options)
    reference = step_dir.parent / "reference"
    params_io.save_params(reference, sources.flatten(in_memory.params))

    got, want = read_leaves(streamed), read_leaves(reference)
    assert got.keys() == want.keys()
    for path in want:
        assert (got[path].dtype, got[path].shape) == (want[path].dtype, want[path].shape), path
        assert got[path].tobytes() == want[path].tobytes(), path
    # Same tree, same value types in Orbax's own metadata, so every reader treats both alike.
    assert _value_types(streamed) == _value_types(reference)
    meta_got = sources.flatten(orbax_compat.tree_metadata(streamed)["params"])
    meta_want = sources.flatten(orbax_compat.tree_metadata(reference)["params"])
    assert {p: (m.shape, m.dtype) for p, m in meta_got.items()} == {p: (m.shape, m.dtype) for p, m in meta_want.items()}


def test_scanned_weights_are_written_one_layer_per_chunk(step_dir, fixture_lora):
    streamed = merge_checkpoint(step_dir, lora=fixture_lora).output / "params"
    layout = json.loads(next((streamed / "array_metadatas").iterdir()).read_text())["array_metadatas"]
    write_shapes = {m["array_metadata"]["param_name"]: m["array_metadata"]["write_shape"] for m in layout}
    gating = write_shapes["params.PaliGemma.llm.layers.mlp.gating_einsum"]
    depth = sources.OrbaxSource(FIXTURE_STEP / "params").tree["PaliGemma/llm/layers/mlp/gating_einsum"].shape[0]
    assert depth > 1
    assert gating[0] == 1  # each layer's slice is its own write: nothing bigger than one slice is ever in memory
    # Leaves without a layer axis are written whole, as Orbax writes them.
    assert write_shapes["params.PaliGemma.llm.final_norm.scale"] == [
        *sources.OrbaxSource(FIXTURE_STEP / "params").tree["PaliGemma/llm/final_norm/scale"].shape
    ]


def test_stream_that_misses_a_leaf_fails_and_writes_nothing(tmp_path):
    structure = {"a/x": ShapeDtype((2, 3), "float32"), "a/y": ShapeDtype((4,), "float32")}

    def stream():
        yield orbax_stream.whole("a/x", np.ones((2, 3), np.float32))

    with pytest.raises(RuntimeError, match=r"without producing 1 leaves, e.g. \['a/y'\]"):
        orbax_stream.save(tmp_path / "params", structure, stream)
    assert not (tmp_path / "params").exists()


def test_stream_with_a_wrong_slice_shape_fails(tmp_path):
    structure = {"a/x": ShapeDtype((2, 3), "float32")}

    def stream():
        yield orbax_stream.LeafWrite("a/x", iter([((0,), np.ones((4,), np.float32))]), lead_ndim=1)

    with pytest.raises(RuntimeError, match=r"a/x\[0\]: got float32\[4\]"):
        orbax_stream.save(tmp_path / "params", structure, stream)


@pytest.mark.parametrize("max_inflight_bytes", [0, 3 * (2 * 8 * 4), orbax_stream.MAX_INFLIGHT_BYTES])
def test_pieces_land_in_place_whatever_the_write_buffer(tmp_path, max_inflight_bytes):
    # 3 layers x 4 column pieces of [2, 8] float32; the middle buffer lets 3 pieces wait for TensorStore at a time.
    value = np.random.default_rng(0).standard_normal((3, 2, 32)).astype(np.float32)
    structure = {"w": ShapeDtype(value.shape, "float32")}

    def pieces():
        for layer in range(3):
            for start in range(0, 32, 8):
                yield (layer, slice(start, start + 8)), value[layer, :, start : start + 8].copy()

    def stream():
        yield orbax_stream.LeafWrite("w", pieces(), lead_ndim=1, columns=8)

    orbax_stream.save(tmp_path / "params", structure, stream, max_inflight_bytes=max_inflight_bytes)
    assert read_leaves(tmp_path / "params")["w"].tobytes() == value.tobytes()


def test_merge_on_save_default_buffer_is_the_writers():
    from openpi_merge_plugin.openpi_glue.training_options import MergeOnSaveOptions

    assert MergeOnSaveOptions().host_buffer_mib << 20 == orbax_stream.MAX_INFLIGHT_BYTES


def test_sliced_reads_equal_whole_reads_bitwise(step_dir, fixture_lora):
    # The fixture's arrays are one chunk each, as openpi writes them; a merged output is chunked per column piece.
    merged = merge_checkpoint(step_dir, lora=fixture_lora).output / "params"
    for params_dir in (FIXTURE_STEP / "params", merged):
        src = sources.OrbaxSource(params_dir)
        for path in src.tree:
            whole = src.read([path])[path]
            x = src.sliced(path)
            assert isinstance(x, sources.SlicedArray), path
            assert (x.shape, x.dtype) == (whole.shape, whole.dtype), path
            assert x[()].tobytes() == whole.tobytes(), path
            for layer in range(whole.shape[0] if whole.ndim >= 3 else 0):
                assert x[(layer,)].tobytes() == whole[layer].tobytes(), (path, layer)


def test_sliced_falls_back_to_whole_reads_without_ocdbt(tmp_path):
    value = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False)) as ckptr:
        ckptr.save(tmp_path / "params", args=ocp.args.PyTreeSave({"params": {"w": value}}))
    x = sources.OrbaxSource(tmp_path / "params").sliced("w")
    assert isinstance(x, np.ndarray)
    assert x.tobytes() == value.tobytes()


def test_a_write_that_fails_after_the_last_piece_is_an_error():
    # Small checkpoints fit the write buffer whole, so every write is still pending when the stream ends: their
    # errors (a full disk) must come out of the save, not be dropped.
    import asyncio

    async def write(*, fails: bool) -> None:
        await asyncio.sleep(0)
        if fails:
            raise OSError(27, "File too large")

    async def save() -> None:
        inflight = orbax_stream._Inflight(orbax_stream.MAX_INFLIGHT_BYTES)  # noqa: SLF001
        for fails in (False, True, False):
            await inflight.add(asyncio.ensure_future(write(fails=fails)), 8)
        await inflight.drain(raise_first=True)

    with pytest.raises(OSError, match="File too large"):
        asyncio.run(save())
