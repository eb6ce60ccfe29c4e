"""openpi's adapters as PEFT LoRA factors of LeRobot's Linears (`lora/peft_adapter`), against openpi itself.

On the bundled example (a real openpi LoRA checkpoint, tests/data/openpi-15a9616/lora-tiny): for every adapted
weight, PEFT's delta `scaling * lora_B @ lora_A` on LeRobot's Linear equals what our merge changed in the merged
LeRobot export (the export minus the step's own weights laid out the same way), and on the goldens it is openpi's
own `lora.Einsum` / `lora.FeedForward._dot` LoRA term (`out_lora - out_base`). Beyond the example: rsLoRA, alpha that
is not a multiple of the rank, `qkv_einsum`, and the layouts no Linear can hold.
"""

import json
import math

from helpers import FIXTURE
from helpers import FIXTURE_LORA_CONFIG
from helpers import golden_entries
import numpy as np
import pytest
from safetensors.numpy import load_file

from openpi_merge_plugin.formats import lerobot_layout
from openpi_merge_plugin.formats import tensors as layout
from openpi_merge_plugin.formats.base import ExportOptions
from openpi_merge_plugin.lora import configs
from openpi_merge_plugin.lora import equations as eq
from openpi_merge_plugin.lora import peft_adapter
from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.lora.spec import LoRASpec
from openpi_merge_plugin.merge import engine
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.pipeline import export

MODEL = json.loads((FIXTURE / "model_config.json").read_text())


@pytest.fixture(scope="module")
def example(fixture_params):
    """The example's adapters and the LeRobot export's layout of its merge (names, layer, split, ops per Linear)."""
    tree = {p: ShapeDtype(tuple(a.shape), str(a.dtype)) for p, a in fixture_params.items()}
    adapters = engine.plan(tree, configs.from_file(FIXTURE_LORA_CONFIG))
    structure = engine.merged_structure(tree, adapters, engine.MergeOptions())
    merged = lerobot_layout.build_lerobot_layout(
        {p: (sd.shape, sd.dtype) for p, sd in structure.items()},
        paligemma=layout.dims_from_params(structure, ""),
        action_expert=layout.dims_from_params(structure, "_1"),
        action_dim=MODEL["pi0_config"]["action_dim"],
        allow_nonstandard_dims=True,
    )
    by_base = {a.base_path: a for a in adapters}
    linears = [(s, by_base[s.recipe.source]) for s in merged.tensors if s.recipe.source in by_base]
    return {"adapters": adapters, "linears": linears, "layout": merged}


def linear_lora(delta, a, b, scale, *, split=None, ops=()) -> peft_adapter.LinearLoRA:
    """PEFT's factors of one layer slice of an adapter as the export makes them: the factoring's ops on `a` and `b`,
    applied by `tensors.apply`; alpha by `peft_alpha`."""
    f = peft_adapter.factoring(delta, np.shape(a), np.shape(b), split=split, ops=ops)
    made = [
        layout.apply(
            layout.Recipe(
                "lora", np.shape(x), None, None, f.ops(k), round_bf16=False, dtype="float32", shape=f.shape(k)
            ),
            x,
        )
        for k, x in (("A", a), ("B", b))
    ]
    return peft_adapter.LinearLoRA(made[0], made[1], peft_adapter.peft_alpha(scale, f.rank))


def _lora_of(spec, adapter, params) -> peft_adapter.LinearLoRA:
    layer = spec.recipe.layer
    a, b = params[adapter.a_path][layer], params[adapter.b_path][layer]
    return linear_lora(adapter.delta, a, b, adapter.scale, split=spec.recipe.split, ops=spec.recipe.ops)


def test_every_adapted_linear_gets_openpi_rank_structure_and_scale(example, fixture_params):
    """q_einsum: rank heads x L (lora_B block-diagonal over heads); kv_einsum: kv_heads x L per half; attn_vec_einsum:
    L (lora_b summed over heads); the MLP's three: L, scaling 1 (openpi never scales it, whatever alpha is);
    attention: openpi's alpha / rank per expert (2.0 and 1.0 here)."""
    rank = {0: 4, 1: 2}
    heads = {0: MODEL["gemma_variants"]["fx_lora_a"]["num_heads"], 1: MODEL["gemma_variants"]["fx_lora_b"]["num_heads"]}
    seen = set()
    for spec, adapter in example["linears"]:
        lora = _lora_of(spec, adapter, fixture_params)
        weight_name = adapter.module.split("/")[-1].rstrip("_1").removesuffix("_")
        expected_rank = rank[adapter.expert] * (heads[adapter.expert] if weight_name == "q_einsum" else 1)
        assert lora.rank == expected_rank, spec.name
        assert lora.lora_a.shape == (lora.rank, spec.shape[1])
        assert lora.lora_b.shape == (spec.shape[0], lora.rank)
        assert lora.lora_a.dtype == lora.lora_b.dtype == np.float32
        want_scale = 1.0 if adapter.kind == "ffn" else {0: 8.0 / 4, 1: 2.0 / 2}[adapter.expert]
        assert lora.scaling == want_scale, spec.name
        seen.add(spec.name.split(".layers.")[1].split(".", 1)[1])
    assert len(example["linears"]) == 2 * 3 * 7  # two experts x three layers x (q, k, v, o, gate, up, down)
    assert len(seen) == 7


def test_q_einsum_lora_b_is_block_diagonal_over_heads(example, fixture_params):
    spec, adapter = next((s, a) for s, a in example["linears"] if "gemma_expert" not in s.name and "q_proj" in s.name)
    lora = _lora_of(spec, adapter, fixture_params)
    n, head_dim = MODEL["gemma_variants"]["fx_lora_a"]["num_heads"], MODEL["gemma_variants"]["fx_lora_a"]["head_dim"]
    blocks = lora.lora_b.reshape(n, head_dim, n, -1)
    for i in range(n):
        for j in range(n):
            assert np.any(blocks[i, :, j]) == (i == j)


def test_peft_delta_is_what_our_merge_changed_in_the_lerobot_export(tmp_path, step_dir, example, fixture_params):
    """For every adapted Linear (42): `scaling * lora_B @ lora_A` equals the merged LeRobot export (float32) minus the
    step's own weight laid out by the same recipe, to the float32 rounding of the merged weight."""
    options = ExportOptions(
        precision="float32", action_horizon=MODEL["pi0_config"]["action_horizon"], allow_nonstandard_dims=True
    )
    result = export.export(
        step_dir,
        "lerobot",
        options=options,
        output=tmp_path / "merged_lerobot",
        lora=checkpoint_merge.LoRASource(lora_config=FIXTURE_LORA_CONFIG),
    )
    exported = load_file(result.output / "model.safetensors")
    worst = 0.0
    for spec, adapter in example["linears"]:
        base = layout.apply(spec.recipe, fixture_params[spec.recipe.source]).astype(np.float64)
        merged_delta = exported[spec.name].astype(np.float64) - base
        peft_delta = _lora_of(spec, adapter, fixture_params).delta()
        # Both are openpi's delta; the merged one went through float32 (w + delta) once more.
        ulp = np.spacing(np.abs(exported[spec.name])).max()
        err = np.max(np.abs(peft_delta - merged_delta))
        assert err <= 2 * ulp, (spec.name, err, ulp)
        worst = max(worst, err / np.max(np.abs(merged_delta)))
    assert worst < 1e-5


def _golden_cases():
    for entry in golden_entries():
        if entry["equation"] == "feedforward":  # the whole MLP (nonlinear): its matrices are the `_dot` entries
            continue
        yield pytest.param(entry, id=entry.get("key_prefix") or f"{entry['module_path']}.L{entry['layer_index']}")


@pytest.mark.parametrize("entry", list(_golden_cases()))
def test_peft_lora_term_is_openpis_on_the_goldens(entry, example, fixture_params):
    """openpi's own LoRA term on a probe (`out_lora - out_base` of `lora.Einsum`, or of `FeedForward._dot` for one
    MLP matrix) equals the probe through PEFT's factors on the Linear (`x @ (scaling * lora_B @ lora_A).T`)."""
    goldens = np.load(FIXTURE / "golden_layers.npz")
    prefix = entry.get("key_prefix") or f"{entry['module_path'].rsplit('/', 1)[-1]}.L{entry['layer_index']}"
    probe = goldens[f"{prefix}.probe"].astype(np.float64)
    term = goldens[f"{prefix}.out_lora"].astype(np.float64) - goldens[f"{prefix}.out_base"].astype(np.float64)
    if entry["equation"] == "feedforward._dot":
        weight, split = entry["piece"].split("[")[0], (int(entry["piece"][-2]) if "[" in entry["piece"] else None)
        base_path, layer_eqn = f"{entry['module_path']}/{weight}", eq.MODULE_EQUATIONS[weight]
        x_labels, out_labels = (
            "BTD" if weight == "gating_einsum" else "BTF",
            "BTF" if weight == "gating_einsum" else "BTD",
        )
    else:
        base_path, layer_eqn, split = entry["param_paths"]["w"], entry["equation"], None
        x_labels, _, out_labels = eq.split_equation(layer_eqn)
    for spec, adapter in example["linears"]:
        r = spec.recipe
        if r.source != base_path or r.layer != entry["layer_index"] or (split is not None and r.split != split):
            continue
        lora = _lora_of(spec, adapter, fixture_params)
        f = peft_adapter.factoring(
            adapter.delta,
            fixture_params[adapter.a_path].shape[1:],
            fixture_params[adapter.b_path].shape[1:],
            split=r.split,
            ops=r.ops,
        )
        # The delta equation names the weight's axes as the layer equation does (digits renamed to letters).
        letter = dict(zip(eq.split_equation(layer_eqn)[1], eq.split_equation(adapter.delta.equation)[2], strict=True))
        x = _as_matrix(probe, [letter.get(c, c) for c in x_labels], f.axes.in_labels)
        out = term
        if split is None and r.split is not None:  # the golden has both halves (kv_einsum's "2" axis)
            out, out_labels_here = np.take(term, r.split, axis=0), out_labels[1:]
        else:
            out_labels_here = out_labels[1:] if len(out_labels) == term.ndim + 1 else out_labels
        want = _as_matrix(out, [letter.get(c, c) for c in out_labels_here], f.axes.out_labels)
        got = x @ lora.delta().T
        assert np.max(np.abs(got - want)) <= 2e-5 * np.max(np.abs(want)), spec.name
        break
    else:
        pytest.fail(f"no LeRobot Linear for {base_path} layer {entry['layer_index']}")


def _as_matrix(array: np.ndarray, labels: list[str], features: str) -> np.ndarray:
    """`array` (axes `labels`) as [everything else, features in C order]."""
    order = [i for i, c in enumerate(labels) if c not in features] + [labels.index(c) for c in features]
    n = math.prod(array.shape[labels.index(c)] for c in features)
    return array.transpose(order).reshape(-1, n)


@pytest.mark.parametrize(("scale", "rank"), [(2.0, 16), (1.0, 8), (3.0 / math.sqrt(2), 8), (16 / math.sqrt(4), 12)])
def test_lora_alpha_gives_openpis_scale_exactly(scale, rank):
    alpha = peft_adapter.peft_alpha(scale, rank)
    assert alpha / rank == scale  # PEFT: self.scaling = lora_alpha / r (Python floats)


def test_peft_alpha_is_exact_where_a_float_divides_to_the_scale_else_one_ulp_off():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        scale, rank = float(rng.uniform(0.01, 100)) / math.sqrt(int(rng.integers(1, 64))), int(rng.integers(1, 512))
        got = peft_adapter.peft_alpha(scale, rank) / rank
        assert abs(got - scale) <= math.ulp(scale)
        if got != scale:  # then no float near scale * rank divides to it (about 1 in 9 here)
            alpha = scale * rank
            for _ in range(32):
                alpha = math.nextafter(alpha, math.inf)
            for _ in range(64):
                assert alpha / rank != scale
                alpha = math.nextafter(alpha, -math.inf)


def _laid_out_delta(delta_eq, a, b, scale, split, ops, out_shape):
    delta = np.einsum(delta_eq.equation, a, b) * scale
    if split is not None:
        delta = delta[split]
    recipe = layout.Recipe("w", delta.shape, None, None, tuple(ops), round_bf16=False, dtype="float32", shape=out_shape)
    return layout.apply(recipe, delta.astype(np.float32)).astype(np.float64)


@pytest.mark.parametrize("rslora", [False, True])
def test_qkv_einsum_and_rslora_beyond_the_example(rslora):
    """`qkv_einsum` (as many kv heads as heads: one weight of three Linears), rsLoRA with alpha not a multiple of the
    rank, laid out as PI0Pytorch's q_proj / k_proj rows would be: every third of it factors exactly."""
    spec = LoRASpec(rank=3, alpha=5.0, rslora=rslora)
    n, d, h = 4, 24, 8
    delta_eq = eq.delta_equation(eq.MODULE_EQUATIONS["qkv_einsum"])
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, n, d, spec.rank)), rng.standard_normal((3, n, spec.rank, h))
    ops = (("transpose", (0, 2, 1)), ("reshape", (n * h, d)))
    for split in range(3):
        lora = linear_lora(delta_eq, a, b, spec.scaling_value, split=split, ops=ops)
        assert lora.rank == n * spec.rank
        assert lora.scaling == spec.scaling_value == (5.0 / math.sqrt(3) if rslora else 5.0 / 3)
        want = _laid_out_delta(delta_eq, a, b, spec.scaling_value, split, ops, (n * h, d))
        np.testing.assert_allclose(lora.delta(), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


def test_attn_vec_layout_keeps_rank_l_and_sums_lora_b_over_heads():
    delta_eq = eq.delta_equation(eq.MODULE_EQUATIONS["attn_vec_einsum"])
    rng = np.random.default_rng(2)
    n, h, d, rank = 4, 8, 16, 2
    a, b = rng.standard_normal((n, h, rank)), rng.standard_normal((n, rank, d))
    ops = (("reshape", (n * h, d)), ("transpose", (1, 0)))
    lora = linear_lora(delta_eq, a, b, 0.5, ops=ops)
    assert lora.rank == rank
    np.testing.assert_allclose(lora.lora_b, b.sum(axis=0).T.astype(np.float32), rtol=1e-6)
    want = _laid_out_delta(delta_eq, a, b, 0.5, None, ops, (d, n * h))
    np.testing.assert_allclose(lora.delta(), want, rtol=0, atol=1e-6 * np.max(np.abs(want)))


def test_layouts_that_are_not_one_linear_are_refused():
    labels, shape = "NDH", (4, 6, 8)
    with pytest.raises(peft_adapter.PeftLayoutError, match="not a Linear"):
        peft_adapter.linear_axes(labels, shape, ())
    with pytest.raises(peft_adapter.PeftLayoutError, match="splits an axis"):
        peft_adapter.linear_axes(labels, shape, (("reshape", (2, 96)),))
    axes = peft_adapter.linear_axes(labels, shape, (("transpose", (0, 2, 1)), ("reshape", (32, 6))))
    assert (axes.out_labels, axes.in_labels) == ("NH", "D")
    # a size-1 axis (one kv head) rides with the axes after it: it changes no index
    axes = peft_adapter.linear_axes("KDH", (1, 6, 8), (("transpose", (0, 2, 1)), ("reshape", (8, 6))))
    assert (axes.out_labels, axes.in_labels) == ("KH", "D")


def test_a_rank_label_a_factor_lacks_is_an_identity_beside_it():
    """An equation beyond openpi's modules: an attn_vec-like adapter whose lora_a has no head axis but whose lora_b
    does (`HL,NLD->NHD`). The head is then part of PEFT's rank, and lora_A holds lora_a beside an identity over heads
    (the `identity` op); the product is the delta laid out."""
    delta_eq = eq.DeltaEquation("HL,NLD->NHD", "BTNH,NHD->BTD", ("", ""))
    rng = np.random.default_rng(4)
    n, h, d, rank = 3, 4, 5, 2
    a, b = rng.standard_normal((h, rank)), rng.standard_normal((n, rank, d))
    ops = (("reshape", (n * h, d)), ("transpose", (1, 0)))
    f = peft_adapter.factoring(delta_eq, a.shape, b.shape, ops=ops)
    assert (f.rank, f.rank_labels) == (n * rank, "LN")
    assert ("identity", (n,)) in f.ops("A")
    lora = linear_lora(delta_eq, a, b, 0.5, ops=ops)
    want = _laid_out_delta(delta_eq, a, b, 0.5, None, ops, (d, n * h))
    np.testing.assert_allclose(lora.delta(), want, rtol=0, atol=1e-6 * np.max(np.abs(want)))


def test_lora_ops_copy_exactly_and_sum_in_float64():
    """The LoRA ops of `tensors.apply`: `diagonal` and `identity` copy the values (the rest +0.0, whatever the array
    holds: -0.0, NaN), `take` picks, `sum` adds in float64 before the float32 rounding."""
    x = np.array([[1.0, -0.0], [np.nan, 2.5]], np.float32)

    def run(ops, shape, array=x):
        return layout.apply(
            layout.Recipe("x", array.shape, None, None, ops, round_bf16=False, dtype="float32", shape=shape), array
        )

    diag = run((("diagonal", (0,)),), (2, 2, 2))
    for i in range(2):
        np.testing.assert_array_equal(diag[i, :, i], x[i])
        assert not np.signbit(diag[i, :, 1 - i]).any()
        assert (diag[i, :, 1 - i] == 0).all()
    eye = run((("identity", (3,)),), (2, 2, 3, 3))
    np.testing.assert_array_equal(eye[..., 1, 1], x)
    assert (eye[..., 0, 1] == 0).all()
    np.testing.assert_array_equal(run((("take", (1, 0)),), (2,)), x[:, 0])
    big = np.array([2**24, 1.0, -(2**24)], np.float32)  # float32 sums to 0 in this order; float64 to 1
    assert run((("sum", (0,)),), (), big) == np.float32(1.0)
