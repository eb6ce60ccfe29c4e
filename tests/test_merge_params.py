"""The in-memory API: options, sharded inputs, and agreement with the checkpoint path."""

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import errors
from openpi_merge_plugin import lora_configs
from openpi_merge_plugin import merge_params
from openpi_merge_plugin import slice_ops
from openpi_merge_plugin import sources

Q = "PaliGemma/llm/layers/attn/q_einsum/w"
LINEAR = "PaliGemma/llm/layers/mlp/linear"


def _nested(flat):
    return sources.unflatten(flat)


def test_strength_scales_the_delta_linearly(fixture_params, fixture_lora):
    params = _nested(fixture_params)
    full = sources.flatten(merge_params(params, fixture_lora).params)
    zero = sources.flatten(merge_params(params, fixture_lora, MergeOptions(strength=0.0)).params)
    half = sources.flatten(merge_params(params, fixture_lora, MergeOptions(strength=0.5)).params)
    for path in (Q, LINEAR):
        base = fixture_params[path].astype(np.float32)
        np.testing.assert_array_equal(zero[path], base)
        np.testing.assert_allclose(half[path] - base, 0.5 * (full[path] - base), rtol=1e-5, atol=1e-7)
        assert not np.allclose(full[path], base)


def test_preserve_keeps_the_base_dtype(fixture_params, fixture_lora):
    merged = sources.flatten(
        merge_params(_nested(fixture_params), fixture_lora, MergeOptions(output_dtype="preserve")).params
    )
    assert merged[Q].dtype == fixture_params[Q].dtype == np.dtype("bfloat16")
    assert not any("lora" in p for p in merged)


def test_rslora_scale_is_alpha_over_sqrt_rank(fixture_params):
    tree = sources.InMemorySource(_nested(fixture_params)).tree
    plain = lora_configs.uniform(tree, alpha=8.0)
    rs = lora_configs.uniform(tree, alpha=8.0, rslora=True)
    r_plain = merge_params(_nested(fixture_params), plain).report
    r_rs = merge_params(_nested(fixture_params), rs).report
    scales = {w.path: (w.scale, w.rank) for w in r_rs.weights}
    assert scales[Q] == (8.0 / 2.0, 4)  # alpha / sqrt(4)
    assert scales[LINEAR] == (1.0, 4)  # MLP: never scaled
    plain_q = next(w for w in r_plain.weights if w.path == Q)
    rs_q = next(w for w in r_rs.weights if w.path == Q)
    np.testing.assert_allclose(rs_q.delta_rel_norm_total, plain_q.delta_rel_norm_total * 2.0, rtol=1e-5)
    assert rs_q.max_rel_err < 1e-5


def test_sharded_inputs_keep_their_sharding_and_values(fixture_params, fixture_lora):
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "fsdp"))

    def shard(x):
        # Like openpi's fsdp_sharding: the largest axis divisible by the fsdp size is sharded.
        spec = [None] * x.ndim
        for axis in np.argsort(x.shape)[::-1]:
            if x.shape[axis] % 4 == 0:
                spec[axis] = "fsdp"
                break
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))

    sharded = {p: shard(v) for p, v in fixture_params.items()}
    got = sources.flatten(merge_params(_nested(sharded), fixture_lora).params)
    want = sources.flatten(merge_params(_nested(fixture_params), fixture_lora).params)
    assert set(got) == set(want)
    for path, value in got.items():
        assert isinstance(value, jax.Array)
        assert value.sharding == sharded[path].sharding, path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[path]))


def test_verification_catches_a_wrong_merge(fixture_params, fixture_lora, monkeypatch):
    real = slice_ops.merge_slice

    def textbook(w, a, b, factor, key, **kw):
        # Per-head A[n] @ B[n] for attn_vec_einsum: the common community mistake.
        if kw["delta_eqn"] == "NHL,aLD->NHD":
            kw = {**kw, "delta_eqn": "NHL,NLD->NHD"}
        return real(w, a, b, factor, key, **kw)

    monkeypatch.setattr(slice_ops, "merge_slice", textbook)
    with pytest.raises(errors.VerificationError, match=r"attn_vec_einsum/w .*does not reproduce the LoRA forward"):
        merge_params(_nested(fixture_params), fixture_lora)
