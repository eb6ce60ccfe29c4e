"""Reading arrays by stream-decoding their chunks (`zarr_stream`) against TensorStore's reads of the same arrays."""

import pathlib
import sys

from helpers import FIXTURE_STEP
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.checkpoint import zarr_stream
from openpi_merge_plugin.errors import CheckpointError

# shape, chunks, dtype, compressor: edge chunks on every axis, chunks along the first axis only, along the last only,
# one whole chunk, not compressed, integers.
LAYOUTS = [
    ((5, 3, 7, 9), (2, 2, 4, 4), "bfloat16", {"id": "zstd", "level": 1}),
    ((6, 4, 8), (4, 4, 8), "<f4", {"id": "zstd", "level": 3}),
    ((3, 2, 16, 20), (3, 2, 16, 8), "bfloat16", {"id": "zstd", "level": 1}),
    ((11, 13), (11, 13), "<f4", None),
    ((4, 5, 6), (3, 5, 4), "<i4", {"id": "zstd", "level": 1}),
]


_OUT_OF_LINE = {"max_inline_value_bytes": 0}  # these chunks are small: store them in data files, as large ones are


def _write_ocdbt(root: pathlib.Path, arrays: dict[str, tuple]) -> dict[str, np.ndarray]:
    """Writes zarr v2 arrays into one OCDBT database at `root` (as Orbax does); returns their values."""
    values = {}
    rng = np.random.default_rng(0)
    for name, (shape, chunks, dtype, compressor) in arrays.items():
        value = (rng.standard_normal(shape) * 100).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        store = ts.open(
            {
                "driver": "zarr",
                "kvstore": {"driver": "ocdbt", "base": f"file://{root}", "path": name, "config": _OUT_OF_LINE},
                "metadata": {"shape": shape, "chunks": chunks, "dtype": dtype, "compressor": compressor},
            },
            create=True,
        ).result()
        store.write(value).result()
        values[name] = value
    return values


def _reads(shape: tuple[int, ...]) -> list:
    """Every index form the merge and the export read with, in order, then out of order."""
    in_order = [(i,) for i in range(shape[0])] + [(i, j) for i in range(shape[0]) for j in range(shape[1])]
    ranges = [slice(0, 1), slice(1, shape[0] - 1), slice(0, shape[0]), slice(shape[0] - 1, shape[0] + 5)]
    return [(), *in_order, *ranges, (shape[0] - 1,), (0,), (shape[0] // 2, shape[1] - 1), ()]


def test_streamed_reads_equal_tensorstore_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 0)
    arrays = {f"a{i}": layout for i, layout in enumerate(LAYOUTS)}
    values = _write_ocdbt(tmp_path, arrays)
    index = zarr_stream.OcdbtIndex.load(tmp_path)
    for name, (shape, chunks, _, _) in arrays.items():
        streamed = zarr_stream.open_streamed(index, name, name)
        assert streamed is not None, name
        assert (streamed.shape, streamed.chunks, streamed.dtype) == (shape, chunks, values[name].dtype)
        for read in _reads(shape):
            got, want = streamed[read], values[name][read]
            assert (got.dtype, got.shape) == (want.dtype, want.shape), (name, read)
            assert got.tobytes() == want.tobytes(), (name, read)


def test_small_chunks_and_unknown_layouts_are_left_to_tensorstore(tmp_path):
    arrays = {"small": ((4, 8), (4, 8), "<f4", {"id": "zstd", "level": 1})}
    _write_ocdbt(tmp_path, arrays)
    ts.open(
        {
            "driver": "zarr3",
            "kvstore": {"driver": "ocdbt", "base": f"file://{tmp_path}", "path": "v3"},
            "metadata": {"shape": [64], "data_type": "float32"},
        },
        create=True,
    ).result().write(np.ones(64, np.float32)).result()
    index = zarr_stream.OcdbtIndex.load(tmp_path)
    assert zarr_stream.open_streamed(index, "small", "small") is None  # below STREAM_MIN_CHUNK_BYTES
    assert zarr_stream.open_streamed(index, "v3", "v3") is None  # zarr v3: not this reader's layout
    assert zarr_stream.OcdbtIndex.load(tmp_path / "missing") is None


def test_every_leaf_of_a_real_checkpoint_reads_as_tensorstore_reads_it(monkeypatch):
    """openpi's own checkpoint (written by its train.py): every leaf whose chunks are stored out of line streams,
    and reads bitwise as TensorStore reads it, whole and a layer at a time."""
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 0)
    source = sources.OrbaxSource(FIXTURE_STEP / "params")
    arrays = {path: source.sliced(path) for path in source.tree}
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 1 << 62)
    streamed = 0
    for path, array in arrays.items():
        reference = source.sliced(path)
        assert not reference.streamed
        if not array.streamed:
            continue
        streamed += 1
        for read in [()] + [(i,) for i in range(array.shape[0] if array.shape else 0)]:
            assert array[read].tobytes() == reference[read].tobytes(), (path, read)
    assert streamed >= len(source.tree) // 2  # the layer weights and adapters, at least


def test_a_truncated_chunk_is_a_checkpoint_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 0)
    _write_ocdbt(tmp_path, {"w": ((6, 4, 8), (6, 4, 8), "<f4", {"id": "zstd", "level": 1})})
    index = zarr_stream.OcdbtIndex.load(tmp_path)
    ref = index.values[b"w/0.0.0"]
    with open(ref.file, "r+b") as f:
        f.truncate(ref.offset + ref.length // 2)
    array = sources.SlicedArray(zarr_stream.open_streamed(index, "w", "w").__getitem__, (6, 4, 8), "f4", tmp_path, "w")
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        array[(5,)]


def test_a_merge_read_streamed_equals_one_read_through_tensorstore(tmp_path, fixture_lora, monkeypatch):
    """The merged checkpoint, with every leaf read streamed, is the one read through TensorStore, bitwise."""

    def merge(threshold: int, name: str) -> sources.OrbaxSource:
        monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", threshold)
        out = tmp_path / name
        merge_checkpoint(FIXTURE_STEP, lora=fixture_lora, output=out, options=MergeOptions())
        return sources.OrbaxSource(out / "params")

    got, want = merge(0, "streamed"), merge(1 << 62, "tensorstore")
    assert got.tree == want.tree
    for path in want.tree:
        assert got.read([path])[path].tobytes() == want.read([path])[path].tobytes(), path


def test_without_zstandard_chunks_are_read_through_tensorstore(tmp_path, fixture_lora, monkeypatch, caplog):
    """python-zstandard missing (an environment installed with --no-deps): every read goes through TensorStore, as
    before streaming, instead of failing with "No module named 'zstandard'" on every large read."""
    monkeypatch.setitem(sys.modules, "zstandard", None)  # `import zstandard` raises ImportError
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 0)  # every chunk large enough to stream
    _forget_zstandard()
    try:
        source = sources.OrbaxSource(FIXTURE_STEP / "params")
        assert not any(source.sliced(path).streamed for path in source.tree)
        out = tmp_path / "merged"
        merge_checkpoint(FIXTURE_STEP, lora=fixture_lora, output=out, options=MergeOptions())
    finally:
        _forget_zstandard()
    assert "zstandard is not importable" in caplog.text
    monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", 1 << 62)
    want = sources.OrbaxSource(FIXTURE_STEP / "params")
    got = sources.OrbaxSource(out / "params")
    for path, sd in got.tree.items():
        if path in want.tree and sd.dtype == want.tree[path].dtype:  # passed through: bitwise the step's leaf
            assert got.read([path])[path].tobytes() == want.read([path])[path].tobytes(), path


def _forget_zstandard() -> None:
    """Whether zstandard imports is looked up once per process: look again."""
    if hasattr(zarr_stream, "zstd_available"):
        zarr_stream.zstd_available.cache_clear()
