"""`openpi-merge-lora export --format pytorch` on the bundled fixture (runs without openpi and torch).

The fixture is a real pi0 tree whose SigLIP and vocabulary are shrunk, sizes that upstream's PI0Pytorch fixes; the
layout is told those sizes here. That the layout is upstream's, tensor for tensor, is tests/test_pytorch_layout.py
(fixtures from upstream's converter); that openpi's PyTorch model serves the export is
tests/test_openpi_pytorch_export.py.
"""

import json
import shutil

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.checkpoint import zarr_stream
from openpi_merge_plugin.cli import app as cli
from openpi_merge_plugin.errors import MergeError
from openpi_merge_plugin.formats import pytorch
from openpi_merge_plugin.formats import tensors as pytorch_layout
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export
from openpi_merge_plugin.pipeline import export_stream

MODEL = json.loads((FIXTURE / "model_config.json").read_text())["pi0_config"]


@pytest.fixture
def tiny_vision(monkeypatch, fixture_params):
    """The fixture's SigLIP and vocabulary sizes, read off its params."""
    kernel = fixture_params["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]
    depth, width, heads, head_dim = kernel.shape
    vision = {
        "width": width,
        "depth": depth,
        "mlp_dim": fixture_params["PaliGemma/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"].shape[-1],
        "num_heads": heads,
        "head_dim": head_dim,
        "patch": fixture_params["PaliGemma/img/embedding/kernel"].shape[0],
        "positions": fixture_params["PaliGemma/img/pos_embedding"].shape[1],
    }
    monkeypatch.setattr(pytorch_layout, "VISION", vision)
    monkeypatch.setattr(pytorch_layout, "VOCAB_SIZE", fixture_params["PaliGemma/llm/embedder/input_embedding"].shape[0])


@pytest.fixture
def merged(step_dir, fixture_lora):
    return checkpoint_merge.merge_checkpoint(step_dir, lora=fixture_lora).output


def _options(**kw) -> ExportOptions:
    """The fixture's horizon; its dims are not PI0Pytorch's."""
    return ExportOptions(action_horizon=MODEL["action_horizon"], allow_nonstandard_dims=True, **kw)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_export_of_a_merged_checkpoint_holds_every_tensor_as_laid_out(merged, tiny_vision, precision):
    before = {p.relative_to(merged): p.read_bytes() for p in merged.rglob("*") if p.is_file()}
    result = export.export(merged, "pytorch", options=_options(precision=precision))
    out = merged.parent / "merged_pytorch"
    assert result.output == out
    assert sorted(p.name for p in out.iterdir()) == ["assets", "config.json", "manifest.json", "model.safetensors"]
    assert {p.relative_to(merged): p.read_bytes() for p in merged.rglob("*") if p.is_file()} == before

    source = sources.OrbaxSource(merged / "params")
    params = source.read(source.tree)
    layout = pytorch.build_layout(
        {p: (tuple(a.shape), str(a.dtype)) for p, a in params.items()},
        paligemma=pytorch_layout.dims_from_params(source.tree, ""),
        action_expert=pytorch_layout.dims_from_params(source.tree, "_1"),
        action_dim=MODEL["action_dim"],
        precision=precision,
        allow_nonstandard_dims=True,
    )
    tensors = load_file(out / "model.safetensors")
    assert sorted(tensors) == sorted(t.name for t in layout.tensors)
    dtype = {"float32": np.float32, "bfloat16": pytorch_layout.ml_dtypes.bfloat16}[precision]
    for spec in layout.tensors:
        want = pytorch_layout.apply(spec.recipe, params.get(spec.recipe.source))
        got = tensors[spec.name]
        assert got.dtype == dtype, spec.name
        assert got.tobytes() == want.tobytes(), spec.name
    # The merged q_einsum of layer 1 of the action expert, transposed as PI0Pytorch's q_proj (out, in), and rounded
    # to bf16 in both precisions (PI0Pytorch holds it in bf16 under the config's dtype, as upstream's converter).
    q = params["PaliGemma/llm/layers/attn/q_einsum_1/w"][1].astype(np.float32)  # (heads, width, head_dim)
    got_q = tensors["paligemma_with_expert.gemma_expert.model.layers.1.self_attn.q_proj.weight"].astype(np.float32)
    want_q = q.transpose(0, 2, 1).reshape(-1, q.shape[1]).astype(pytorch_layout.ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got_q, want_q.astype(np.float32))
    # ... while the action projections, float32 in PI0Pytorch, are exact in float32 output.
    exact = params["action_in_proj/kernel"].astype(np.float32).T
    got_exact = tensors["action_in_proj.weight"].astype(np.float32)
    assert (np.array_equal(got_exact, exact)) == (precision == "float32")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {pytorch_layout.EMBED_TOKENS: pytorch_layout.LM_HEAD}  # tied, as save_model writes

    assert json.loads((out / "config.json").read_text()) == {
        "action_dim": MODEL["action_dim"],
        "action_horizon": MODEL["action_horizon"],
        "paligemma_variant": MODEL["paligemma_variant"],
        "action_expert_variant": MODEL["action_expert_variant"],
        "precision": precision,
    }
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == _output.file_checksums(out)
    assert manifest["precision"] == precision
    assert manifest["source"]["merged_on_the_way"] is False
    assert manifest["verification"]["file"]["tensors_checked"] == len(layout.tensors)
    assert manifest["verification"]["merge"]["verified"] is True
    assert manifest["lora_config"] == json.loads((merged / "manifest.json").read_text())["lora_config"]
    assert (out / "assets" / "fixture_robot" / "norm_stats.json").is_file()


def test_export_reading_every_leaf_streamed_writes_the_same_file(step_dir, tiny_vision, merged, monkeypatch):
    """Leaves read by stream-decoding their chunks (`zarr_stream`, every leaf here) give the file read through
    TensorStore gives, byte for byte."""
    files = []
    for name, threshold in (("streamed", 0), ("tensorstore", 1 << 62)):
        monkeypatch.setattr(zarr_stream, "STREAM_MIN_CHUNK_BYTES", threshold)
        result = export.export(
            step_dir,
            "pytorch",
            output=step_dir.parent / name,
            options=_options(),
            lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG),
        )
        files.append((result.output / "model.safetensors").read_bytes())
    assert files[0] == files[1]


def test_export_of_a_lora_step_merges_on_the_way_and_leaves_the_step_alone(step_dir, tiny_vision, merged):
    from_merged = export.export(merged, "pytorch", output=step_dir.parent / "a", options=_options())
    before = sorted(p.relative_to(step_dir) for p in step_dir.rglob("*"))
    from_step = export.export(
        step_dir,
        "pytorch",
        output=step_dir.parent / "b",
        options=_options(),
        lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG),
    )
    assert sorted(p.relative_to(step_dir) for p in step_dir.rglob("*")) == before
    assert from_step.manifest["source"]["merged_on_the_way"] is True
    a = (from_merged.output / "model.safetensors").read_bytes()
    assert (from_step.output / "model.safetensors").read_bytes() == a
    assert not _output.leftovers(step_dir.parent / "b")  # the on-the-way merge is gone
    assert not [p for p in step_dir.parent.rglob("*") if ".tmp" in p.name]


def test_upstream_dimensions_are_required_unless_nonstandard_dims_are_allowed(merged, tiny_vision):
    with pytest.raises(MergeError, match=r"hard-codes dimensions this model does not have: projection_dim 64 \(PI0"):
        export.export(merged, "pytorch", options=ExportOptions(action_horizon=MODEL["action_horizon"]))
    assert not (merged.parent / "merged_pytorch").exists()
    assert not list(merged.parent.glob(".merged_pytorch*"))  # nothing half-written left behind


def test_cli_export_refuses_a_second_run_and_names_what_is_missing(merged, tiny_vision, capsys):
    argv = ["export", str(merged), "--action-horizon", "50", "--allow-nonstandard-dims", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"to {merged.parent / 'merged_pytorch'}" in out
    assert "bitwise as laid out" in out
    assert cli.main(argv) == 1
    assert "exists" in capsys.readouterr().err
    # A merge that names an openpi config this process cannot read: its model config is not guessed.
    named = merged.parent.parent / "named"
    shutil.copytree(merged, named)
    manifest = json.loads((named / "manifest.json").read_text())
    (named / "manifest.json").write_text(json.dumps({**manifest, "serving_config": "no_such_config"}))
    with pytest.raises(MergeError, match=r"needs the model config .* no_such_config.*--action-horizon N"):
        export.export(named, "pytorch", options=ExportOptions(allow_nonstandard_dims=True))
    assert not (merged.parent.parent / "named_pytorch").exists()


def test_export_in_row_blocks_writes_the_same_bytes(step_dir, tiny_vision, merged, monkeypatch):
    """The embedding (no transposes) goes out in row blocks when large: the same file, from a LoRA step and a merged
    directory alike (blocks of a few rows here, so that the fixture's small embedding is split)."""
    whole = export.export(merged, "pytorch", output=step_dir.parent / "a", options=_options())
    monkeypatch.setattr(export_stream, "BLOCK_BYTES", 3000)
    for name, src, lora in (
        ("b", merged, None),
        ("c", step_dir, checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG)),
    ):
        blocks = export.export(src, "pytorch", output=step_dir.parent / name, options=_options(), lora=lora)
        assert (blocks.output / "model.safetensors").read_bytes() == (whole.output / "model.safetensors").read_bytes()
        files = blocks.manifest["files"]["model.safetensors"]
        assert files == _output.file_checksums(blocks.output)["model.safetensors"]
