"""The in-memory API: options, sharded inputs, and agreement with the checkpoint path."""

import re

from helpers import FIXTURE_LORA_CONFIG
from helpers import assert_same_merge
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import pytest

from openpi_merge_plugin import MergeOptions
from openpi_merge_plugin import errors
from openpi_merge_plugin import merge_params
from openpi_merge_plugin.checkpoint import sources
from openpi_merge_plugin.lora import configs as lora_configs
from openpi_merge_plugin.merge import slice_ops

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


FSDP_DEVICES = 4  # openpi's TrainConfig.fsdp_devices; with 8 devices the mesh is (batch 2, fsdp 4)
# openpi replicates arrays under 4 MiB; the fixture's weights are 1.5 KiB to 96 KiB, so the same threshold scaled
# down by 1024 shards most weights and some adapters and replicates the rest, as on a full-size model.
FSDP_MIN_BYTES = 4 << 10


def _fsdp_sharding(x, mesh: Mesh) -> NamedSharding:
    """openpi's `fsdp_sharding` rule for one array (src/openpi/training/sharding.py at commit 15a9616).

    Replicate scalars, vectors and arrays under the size threshold; otherwise shard the largest axis whose size
    the fsdp axis divides; replicate if there is none.
    """
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or x.ndim < 2 or x.size * x.dtype.itemsize < FSDP_MIN_BYTES:
        return NamedSharding(mesh, PartitionSpec())
    for axis in np.argsort(x.shape)[::-1]:
        if x.shape[axis] % fsdp == 0:
            spec = [None] * x.ndim
            spec[axis] = "fsdp"
            return NamedSharding(mesh, PartitionSpec(*spec))
    return NamedSharding(mesh, PartitionSpec())


@pytest.fixture(scope="module")
def fsdp_merge(fixture_params):
    """The fixture's params sharded as openpi's FSDP shards them, merged with every merge_slice call recorded."""
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(8 // FSDP_DEVICES, FSDP_DEVICES), ("batch", "fsdp"))
    sharded = {p: jax.device_put(v, _fsdp_sharding(v, mesh)) for p, v in fixture_params.items()}
    real = slice_ops.merge_slice
    calls = []

    def recorded(w, a, b, factor, key, **kw):
        merged, stats = real(w, a, b, factor, key, **kw)
        calls.append({"args": (w, a, b, factor, key), "kw": kw, "merged": merged})
        return merged, stats

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(slice_ops, "merge_slice", recorded)
        merged = sources.flatten(merge_params(_nested(sharded), lora_configs.from_file(FIXTURE_LORA_CONFIG)).params)
    return {"mesh": mesh, "sharded": sharded, "merged": merged, "calls": calls, "kernel": real}


def _held_whole_by_one_device(x: jax.Array) -> bool:
    return any(shard.data.shape == x.shape for shard in x.addressable_shards)


def test_fsdp_sharded_merge_equals_the_single_device_merge(fsdp_merge, fixture_params, fixture_lora):
    sharded, got = fsdp_merge["sharded"], fsdp_merge["merged"]
    single_device = merge_params(_nested(fixture_params), fixture_lora)
    want = sources.flatten(single_device.params)
    assert set(got) == set(want)
    adapted = [w.path for w in single_device.report.weights]
    # The rule shards every adapted weight, and shards some adapters and replicates the others.
    assert all(not sharded[p].sharding.is_fully_replicated for p in adapted)
    lora = [v.sharding.is_fully_replicated for p, v in sharded.items() if "lora" in p]
    assert any(lora)
    assert not all(lora)
    for path, value in got.items():
        assert isinstance(value, jax.Array)
        assert value.sharding == sharded[path].sharding, path
        assert_same_merge(value, want[path], err_msg=path)


def _largest_sharded_call(fsdp_merge) -> dict:
    """The merge_slice call on the largest sharded layer slice (mlp/gating_einsum)."""
    sharded = [c for c in fsdp_merge["calls"] if not c["args"][0].sharding.is_fully_replicated]
    return max(sharded, key=lambda c: c["args"][0].size)


def _device_bytes(compiled) -> int:
    memory = compiled.memory_analysis()
    return memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes


def test_no_device_holds_a_whole_sharded_weight(fsdp_merge):
    sharded, merged = fsdp_merge["sharded"], fsdp_merge["merged"]
    big = [p for p, v in sharded.items() if p in merged and not v.sharding.is_fully_replicated]
    assert big
    for path in big:
        assert not _held_whole_by_one_device(merged[path]), path
    # Inside the merge: every layer slice of a sharded weight enters and leaves the kernel sharded, so no device
    # holds a whole slice either.
    calls = fsdp_merge["calls"]
    assert len(calls) == 30  # 10 adapted weights x 3 layers
    for call in calls:
        w, merged_slice = call["args"][0], call["merged"]
        assert merged_slice.sharding == w.sharding
        assert not _held_whole_by_one_device(w)
        assert not _held_whole_by_one_device(merged_slice)
    # Per-device peak: CPU devices report no memory_stats(), so compare XLA's own account of the compiled kernel
    # (arguments + outputs + temporaries on one device) with the same kernel on unsharded inputs.
    call = _largest_sharded_call(fsdp_merge)
    kernel = fsdp_merge["kernel"]
    on_one_device = [np.asarray(x) for x in call["args"][:4]] + [call["args"][4]]
    sharded_bytes = _device_bytes(kernel.lower(*call["args"], **call["kw"]).compile())
    whole_bytes = _device_bytes(kernel.lower(*on_one_device, **call["kw"]).compile())
    assert sharded_bytes < 0.7 * whole_bytes, (sharded_bytes, whole_bytes)


def test_the_sharded_kernel_never_gathers_a_whole_weight_slice(fsdp_merge):
    call = _largest_sharded_call(fsdp_merge)
    w = call["args"][0]
    hlo = fsdp_merge["kernel"].lower(*call["args"], **call["kw"]).compile().as_text()
    gathered = [
        int(np.prod([int(d) for d in dims.split(",") if d]))
        for dims in re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", hlo)
    ]
    assert gathered  # the adapters' rank-sized slices are gathered: the pattern does see all-gathers
    assert all(n < w.size for n in gathered), f"all-gathers of {gathered} elements; the slice has {w.size}"


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
