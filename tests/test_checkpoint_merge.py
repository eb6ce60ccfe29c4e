"""Merging the real openpi LoRA checkpoint and checking the result against upstream's golden LoRA outputs."""

import json
import shutil

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import FIXTURE_STEP
from helpers import golden_entries
from helpers import rel_err
from helpers import tree_digest
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import merge_checkpoint
from openpi_merge_plugin.checkpoint import output as _output
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora import configs as lora_configs
from openpi_merge_plugin.lora import equations as eq

HIGHEST = jax.lax.Precision.HIGHEST


def _plain_forward(entry: dict, merged: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The non-LoRA layer openpi would run with the merged weight (lora_config=None)."""
    layer = entry["layer_index"]
    module = entry["module_path"]
    if entry["equation"] == "feedforward":
        gating = merged[f"{module}/gating_einsum"][layer].astype(np.float32)
        linear = merged[f"{module}/linear"][layer].astype(np.float32)
        hidden = jax.nn.gelu(jnp.dot(x, gating[0], precision=HIGHEST)) * jnp.dot(x, gating[1], precision=HIGHEST)
        return np.asarray(jnp.dot(hidden, linear, precision=HIGHEST))
    if entry["equation"] == "feedforward._dot":
        piece = entry["piece"]
        if piece.startswith("gating_einsum"):
            w = merged[f"{module}/gating_einsum"][layer][int(piece[-2])]
        else:
            w = merged[f"{module}/linear"][layer]
        return np.asarray(jnp.dot(x, w.astype(np.float32), precision=HIGHEST))
    (eqn,) = eq.to_letters(entry["equation"])
    return np.asarray(
        jnp.einsum(eqn, x, merged[entry["param_paths"]["w"]][layer].astype(np.float32), precision=HIGHEST)
    )


@pytest.fixture(scope="module")
def merged_fp32(tmp_path_factory):
    step = tmp_path_factory.mktemp("ckpt") / "2"
    shutil.copytree(FIXTURE_STEP, step)
    before = tree_digest(step)
    result = merge_checkpoint(step, lora=lora_configs.from_file(FIXTURE_LORA_CONFIG))
    src = sources.OrbaxSource(result.output / "params")
    return {"step": step, "before": before, "result": result, "params": src.read(src.tree), "source": src}


def test_merged_weights_reproduce_every_golden_lora_output(merged_fp32):
    golden = np.load(FIXTURE / "golden_layers.npz")
    entries = golden_entries()
    assert len(entries) == 28  # every adapted module, layers 0 and 2, both experts, MLP whole and per matrix
    for entry in entries:
        x = golden[entry["probe_key"]]
        want, base = golden[entry["output_keys"]["lora"]], golden[entry["output_keys"]["base"]]
        got = _plain_forward(entry, merged_fp32["params"], x)
        assert rel_err(got, want) < 2e-6, entry["key_prefix"]
        # The adapters move the output by far more than the tolerance, so ignoring or misscaling them fails.
        assert rel_err(base, want) > 1e-2, entry["key_prefix"]


def test_merged_tree_has_exactly_the_non_lora_structure(merged_fp32):
    listing = json.loads((FIXTURE / "params_listing.json").read_text())
    listing = listing.get("params", listing)
    expected = {p for p in listing if "lora" not in p}
    got = merged_fp32["source"].tree
    assert set(got) == expected
    adapted = {a["path"] for a in merged_fp32["result"].manifest["weights"]}
    assert len(adapted) == 10
    for path, sd in got.items():
        assert list(sd.shape) == listing[path]["shape"], path
        assert sd.dtype == ("float32" if path in adapted else listing[path]["dtype"]), path


def test_leaves_without_adapters_are_bitwise_unchanged(merged_fp32, fixture_params):
    adapted = {a["path"] for a in merged_fp32["result"].manifest["weights"]}
    merged = merged_fp32["params"]
    passthrough = [p for p in merged if p not in adapted]
    assert len(passthrough) == 40
    for path in passthrough:
        assert merged[path].dtype == fixture_params[path].dtype, path
        assert merged[path].tobytes() == fixture_params[path].tobytes(), path


def test_lora_checkpoint_is_byte_for_byte_unchanged(merged_fp32):
    step = merged_fp32["step"]
    after = {p: d for p, d in tree_digest(step).items() if not p.startswith("merged/")}
    assert after == merged_fp32["before"]
    assert not _output.leftovers(step / "merged")


def test_manifest_records_what_was_done_and_checksums_match(merged_fp32):
    result = merged_fp32["result"]
    manifest = json.loads((result.output / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["source"]["step"] == 2
    assert manifest["verified"] is True
    assert manifest["max_rel_err"] < 1e-5
    assert manifest["dtype_policy"]["merged_weights"] == "float32"
    # The LoRA config came from a file, not a registered TrainConfig: no serving config, and the manifest says why.
    assert manifest["serving_config"] is None
    assert "not from a registered openpi TrainConfig" in manifest["serving_config_reason"]
    by_path = {w["path"]: w for w in manifest["weights"]}
    q0 = by_path["PaliGemma/llm/layers/attn/q_einsum/w"]
    assert (q0["rank"], q0["alpha"], q0["scale"]) == (4, 8.0, 2.0)
    assert by_path["PaliGemma/llm/layers/mlp/linear"]["scale"] == 1.0  # openpi never scales the MLP LoRA
    assert by_path["PaliGemma/llm/layers/attn/q_einsum_1/w"]["scale"] == 1.0
    assert all(len(w["rel_err"]) == 3 for w in manifest["weights"])  # every layer verified
    assert manifest["files"] == _output.file_checksums(result.output)
    assert "assets/fixture_robot/norm_stats.json" in manifest["files"]


def test_bfloat16_output_rounds_the_delta_and_says_how_much_survives(step_dir, fixture_lora):
    result = merge_checkpoint(step_dir, lora=fixture_lora, options=MergeOptions(output_dtype="bfloat16"))
    src = sources.OrbaxSource(result.output / "params")
    merged = src.read(src.tree)
    golden = np.load(FIXTURE / "golden_layers.npz")
    errs = [
        rel_err(_plain_forward(e, merged, golden[e["probe_key"]]), golden[e["output_keys"]["lora"]])
        for e in golden_entries()
    ]
    # Rounding merged weights to bf16 (8 mantissa bits) costs ~2^-9 relative per weight, not more.
    assert max(errs) < 1.5e-2
    assert max(errs) > 1e-4
    for w in result.report.weights:
        assert w.output_dtype == "bfloat16"
        assert 0.5 < w.bf16_survival_total < 1.0
        assert w.max_rel_err_stored > w.max_rel_err
