"""Merged weights checked against upstream openpi's own modules (`lora.Einsum`, `lora.FeedForward`, `gemma.Module`).

Every check runs a REAL openpi module twice: with its LoRA config on the unmerged params (what training computed),
and with `lora_config=None` / LoRA-free gemma configs on the merged params (what serving will compute). Nothing here
re-derives openpi's LoRA math. Skipped when openpi (15a9616) is not importable.
"""

import json
import pathlib
import shutil
import zlib

from helpers import rel_err
from openpi_support import gate
import pytest

openpi_config = gate.require_openpi(training=False)

import flax.traverse_util as traverse_util  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from openpi.models import gemma  # noqa: E402
from openpi.models import lora  # noqa: E402
from openpi.models import model as _model  # noqa: E402
from openpi.models import pi0_config  # noqa: E402
from openpi.models import pi0_fast  # noqa: E402

from openpi_merge_plugin.lora import equations  # noqa: E402
from openpi_merge_plugin.lora import openpi_configs  # noqa: E402
from openpi_merge_plugin.lora.configs import ResolvedLoRA  # noqa: E402
from openpi_merge_plugin.lora.spec import ExpertLoRA  # noqa: E402
from openpi_merge_plugin.lora.spec import LoRASpec  # noqa: E402
from openpi_merge_plugin.merge.engine import merge_params  # noqa: E402
from openpi_merge_plugin.options import MergeOptions  # noqa: E402
from openpi_merge_plugin.pipeline import checkpoint_merge  # noqa: E402

pytestmark = [
    pytest.mark.openpi,
    pytest.mark.openpi_ci,
    # flax 0.10.2's param shape check calls jnp.shape on a ShapeDtypeStruct on every apply: noise, not ours.
    pytest.mark.filterwarnings("ignore:shape requires ndarray or scalar arguments:DeprecationWarning"),
]

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "openpi-15a9616" / "lora-tiny"
FIXTURE_STEP = FIXTURE / "checkpoint" / "2"
DEPTH = 3  # scanned layers, leading axis of every weight under PaliGemma/llm/layers
F32_TOL = 1e-5


@pytest.fixture(autouse=True)
def _float32_matmuls():
    # Full float32 matmuls even on accelerators (TF32 would cost ~3 digits and hide nothing useful).
    with jax.default_matmul_precision("float32"):
        yield


def _lora_config(rank: int, alpha: float, rslora: bool) -> "lora.LoRAConfig":  # noqa: FBT001
    return lora.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora)


def _resolved(attn0=None, ffn0=None, attn1=None, ffn1=None) -> ResolvedLoRA:
    def spec(cfg):
        return None if cfg is None else LoRASpec.from_openpi(cfg)

    return ResolvedLoRA(
        experts={
            0: ExpertLoRA("test_expert_0", attn=spec(attn0), ffn=spec(ffn0)),
            1: ExpertLoRA("test_expert_1", attn=spec(attn1), ffn=spec(ffn1)),
        },
        source="test_openpi_modules",
    )


# --------------------------------------------------------------------------------------------------------------------
# 1. Single modules: lora.Einsum (every equation gemma uses) and lora.FeedForward, scanned params.

# The equations openpi's gemma.Attention calls lora.Einsum with, and per-layer weight shapes for expert 0 (width 32)
# and expert 1 (width 16).
EINSUM_CASES = {
    "q_einsum": ("BTD,NDH->BTNH", (4, 32, 8), (4, 16, 8)),
    "kv_einsum": ("BSD,2KDH->2BSKH", (2, 2, 32, 8), (2, 2, 16, 8)),
    "qkv_einsum": ("BSD,3KDH->3BSKH", (3, 4, 32, 8), (3, 4, 16, 8)),
    "attn_vec_einsum": ("BTNH,NHD->BTD", (4, 8, 32), (4, 8, 16)),
}
# (rank, alpha, rslora) of expert 0; openpi's scaling_value: 2.0, 4.0 (alpha / sqrt(rank)), 0.25. One rank, so the
# merge kernels compile once per module.
EINSUM_LORA = {
    "r4_a8": (4, 8.0, False),
    "r4_a8_rslora": (4, 8.0, True),
    "r4_a1": (4, 1.0, False),
}
# Expert 1 always gets a different config (scaling 3.0), so mixing up the experts' configs fails too.
EXPERT_1_LORA = (2, 6.0, False)


def _probe(eqn: str, w_shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random float32 input for `eqn`: weight labels take the weight's sizes, the others (batch, tokens) 2 and 5."""
    x_labels, w_labels, _ = equations.split_equation(eqn)
    sizes = dict(zip(w_labels, w_shape, strict=True))
    return rng.standard_normal([sizes.get(c, (2, 5)[min(i, 1)]) for i, c in enumerate(x_labels)]).astype(np.float32)


def _einsum_layers(eqn, shape, cfg, x, rng) -> dict[str, np.ndarray]:
    """Scanned [DEPTH, ...] w/lora_a/lora_b with the shapes openpi's lora.Einsum creates, LoRA term ~10% of output."""
    module = lora.Einsum(shape=shape, lora_config=cfg)
    shapes = jax.tree.map(np.shape, jax.eval_shape(lambda: module.init(jax.random.key(0), eqn, x)))["params"]
    assert sorted(shapes) == ["lora_a", "lora_b", "w"]
    layers = {k: [] for k in shapes}
    for _ in range(DEPTH):
        p = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        base = lora.Einsum(shape=shape).apply({"params": {"w": p["w"]}}, eqn, x)
        full = lora.Einsum(shape=shape, lora_config=cfg).apply({"params": p}, eqn, x)
        # The LoRA term is linear in lora_b: rescale it to 10% of the base output (max norm).
        p["lora_b"] *= np.float32(0.1 * np.max(np.abs(base)) / np.max(np.abs(full - base)))
        for k, v in p.items():
            layers[k].append(v)
    return {k: np.stack(v) for k, v in layers.items()}


@pytest.mark.parametrize("lora_key", sorted(EINSUM_LORA))
@pytest.mark.parametrize("module", sorted(EINSUM_CASES))
def test_merged_einsum_matches_openpi_lora_einsum(module, lora_key):
    eqn, shape_0, shape_1 = EINSUM_CASES[module]
    assert equations.MODULE_EQUATIONS[module] == eqn
    rng = np.random.default_rng(zlib.crc32(f"{module}/{lora_key}".encode()))
    cfgs = [_lora_config(*EINSUM_LORA[lora_key]), _lora_config(*EXPERT_1_LORA)]
    names = [module, f"{module}_1"]
    shapes = [shape_0, shape_1]
    probes = [_probe(eqn, s, rng) for s in shapes]
    unmerged = [_einsum_layers(eqn, s, c, x, rng) for s, c, x in zip(shapes, cfgs, probes, strict=True)]
    params = {"PaliGemma": {"llm": {"layers": {"attn": dict(zip(names, unmerged, strict=True))}}}}

    result = merge_params(params, _resolved(attn0=cfgs[0], attn1=cfgs[1]))
    merged_attn = result.params["PaliGemma"]["llm"]["layers"]["attn"]
    assert sorted(merged_attn) == sorted(names)

    for name, shape, cfg, x, orig in zip(names, shapes, cfgs, probes, unmerged, strict=True):
        assert list(merged_attn[name]) == ["w"]  # lora_a / lora_b are gone
        merged_w = np.asarray(merged_attn[name]["w"])
        assert merged_w.dtype == np.float32
        assert merged_w.shape == (DEPTH, *shape)
        for layer in range(DEPTH):
            layer_params = {k: v[layer] for k, v in orig.items()}
            want = lora.Einsum(shape=shape, lora_config=cfg).apply({"params": layer_params}, eqn, x)
            got = lora.Einsum(shape=shape, lora_config=None).apply({"params": {"w": merged_w[layer]}}, eqn, x)
            without_lora = lora.Einsum(shape=shape).apply({"params": {"w": layer_params["w"]}}, eqn, x)
            # The adapter moves the output by ~10%: a merge that drops or mis-scales it cannot pass.
            assert rel_err(without_lora, want) > 0.05, (name, layer)
            assert rel_err(got, want) < F32_TOL, (name, layer, rel_err(got, want))


# (rank, alpha, rslora) of expert 0's MLP; openpi's lora.FeedForward applies NO scaling, whatever alpha says.
FFN_LORA = {
    "r4_a8": (4, 8.0, False),
    "r4_a6_rslora": (4, 6.0, True),
}


def _ffn_layers(width, hidden, cfg, x, rng) -> dict[str, np.ndarray]:
    """Scanned [DEPTH, ...] MLP params with the names/shapes openpi's lora.FeedForward creates; LoRA ~10% per matmul."""
    module = lora.FeedForward(features=width, hidden_dim=hidden, lora_config=cfg)
    shapes = jax.tree.map(np.shape, jax.eval_shape(lambda: module.init(jax.random.key(0), x)))["params"]
    assert sorted(shapes) == sorted(
        ["gating_einsum", "gating_einsum_lora_a", "gating_einsum_lora_b", "linear", "linear_lora_a", "linear_lora_b"]
    )

    def draw(name, shape):
        fan_in = shape[-2]  # every MLP matrix and lora_a/lora_b contracts its second-to-last axis
        scale = 0.1 if name.endswith("lora_b") else 1.0
        return (scale * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    return {k: np.stack([draw(k, s) for _ in range(DEPTH)]) for k, s in shapes.items()}


@pytest.mark.parametrize("lora_key", sorted(FFN_LORA))
def test_merged_mlp_matches_openpi_lora_feedforward(lora_key):
    rng = np.random.default_rng(zlib.crc32(lora_key.encode()))
    cfgs = [_lora_config(*FFN_LORA[lora_key]), _lora_config(*EXPERT_1_LORA)]
    assert all(c.scaling_value != 1.0 for c in cfgs)  # so a merge that scales the MLP LoRA fails
    names = ["mlp", "mlp_1"]
    dims = [(32, 64), (16, 48)]  # (width, mlp hidden) per expert
    probes = [rng.standard_normal((2, 5, w)).astype(np.float32) for w, _ in dims]
    unmerged = [_ffn_layers(w, h, c, x, rng) for (w, h), c, x in zip(dims, cfgs, probes, strict=True)]
    params = {"PaliGemma": {"llm": {"layers": dict(zip(names, unmerged, strict=True))}}}

    result = merge_params(params, _resolved(ffn0=cfgs[0], ffn1=cfgs[1]))
    merged_layers = result.params["PaliGemma"]["llm"]["layers"]
    assert sorted(merged_layers) == names

    for name, (width, hidden), cfg, x, orig in zip(names, dims, cfgs, probes, unmerged, strict=True):
        merged = {k: np.asarray(v) for k, v in merged_layers[name].items()}
        assert sorted(merged) == ["gating_einsum", "linear"]
        assert merged["gating_einsum"].shape == (DEPTH, 2, width, hidden)
        assert merged["linear"].shape == (DEPTH, hidden, width)
        assert all(v.dtype == np.float32 for v in merged.values())
        for layer in range(DEPTH):
            layer_params = {k: v[layer] for k, v in orig.items()}
            want = lora.FeedForward(features=width, hidden_dim=hidden, lora_config=cfg).apply(
                {"params": layer_params}, x
            )
            got = lora.FeedForward(features=width, hidden_dim=hidden, lora_config=None).apply(
                {"params": {k: v[layer] for k, v in merged.items()}}, x
            )
            without_lora = lora.FeedForward(features=width, hidden_dim=hidden).apply(
                {"params": {k: layer_params[k] for k in ("gating_einsum", "linear")}}, x
            )
            assert rel_err(without_lora, want) > 0.02, (name, layer)
            assert rel_err(got, want) < F32_TOL, (name, layer, rel_err(got, want))


# --------------------------------------------------------------------------------------------------------------------
# 2. LoRA configs read from live openpi model / train configs.


def test_lora_from_pi0_config():
    model = pi0_config.Pi0Config(paligemma_variant="gemma_2b_lora", action_expert_variant="gemma_300m_lora")
    resolved = openpi_configs.lora_from_model(model)
    assert sorted(resolved.experts) == [0, 1]
    for index, variant, rank in ((0, "gemma_2b_lora", 16), (1, "gemma_300m_lora", 32)):
        expert = resolved.experts[index]
        assert expert.variant == variant
        for kind in ("attn", "ffn"):
            spec = expert.get(kind)
            assert spec == LoRASpec(rank=rank, alpha=float(rank), rslora=False, axes=(-2, -1), label="L")
            assert spec.scaling_value == gemma.get_config(variant).lora_configs[kind].scaling_value == 1.0


def test_lora_from_pi0_config_without_lora():
    resolved = openpi_configs.lora_from_model(pi0_config.Pi0Config())  # gemma_2b + gemma_300m
    assert all(e.attn is None and e.ffn is None for e in resolved.experts.values())


def test_lora_from_pi0_fast_config():
    resolved = openpi_configs.lora_from_model(pi0_fast.Pi0FASTConfig(paligemma_variant="gemma_2b_lora"))
    assert list(resolved.experts) == [0]
    expert = resolved.experts[0]
    assert expert.variant == "gemma_2b_lora"
    assert expert.attn == expert.ffn == LoRASpec(rank=16, alpha=16.0, rslora=False, axes=(-2, -1), label="L")


def test_lora_from_train_config():
    resolved = openpi_configs.lora_from_train_config("pi0_libero_low_mem_finetune")
    assert resolved.config_name == "pi0_libero_low_mem_finetune"
    assert sorted(resolved.experts) == [0, 1]
    assert resolved.experts[0].attn == resolved.experts[0].ffn == LoRASpec(rank=16, alpha=16.0)
    assert resolved.experts[1].attn == resolved.experts[1].ffn == LoRASpec(rank=32, alpha=32.0)
    from_model = openpi_configs.lora_from_model(
        pi0_config.Pi0Config(paligemma_variant="gemma_2b_lora", action_expert_variant="gemma_300m_lora")
    )
    assert resolved.experts == from_model.experts


# --------------------------------------------------------------------------------------------------------------------
# 3. Whole two-expert LLM of the lora-tiny fixture against its golden outputs (golden_llm.npz / .json).

MODEL_CONFIG = json.loads((FIXTURE / "model_config.json").read_text())
# Variant name -> (fixture variant whose dims it has, with LoRA?). "fx_a" / "fx_b" are the LoRA-free twins.
FIXTURE_VARIANTS = {
    "fx_lora_a": ("fx_lora_a", True),
    "fx_lora_b": ("fx_lora_b", True),
    "fx_a": ("fx_lora_a", False),
    "fx_b": ("fx_lora_b", False),
}


def _fixture_gemma_config(name: str, *, with_lora: bool) -> gemma.Config:
    v = MODEL_CONFIG["gemma_variants"][name]
    lora_configs = {}
    if with_lora:
        lora_configs = {
            kind: lora.LoRAConfig(
                rank=c["rank"], alpha=c["alpha"], rslora=c["rslora"], axes=tuple(c["axes"]), label=c["label"]
            )
            for kind, c in v["lora_configs"].items()
        }
    dims = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    return gemma.Config(**{k: v[k] for k in dims}, lora_configs=lora_configs)


@pytest.fixture
def fixture_variants(monkeypatch):
    """Registers the fixture's gemma variants with openpi, as the fixture generator did."""
    original = gemma.get_config

    def get_config(variant):
        if variant in FIXTURE_VARIANTS:
            name, with_lora = FIXTURE_VARIANTS[variant]
            return _fixture_gemma_config(name, with_lora=with_lora)
        return original(variant)

    monkeypatch.setattr(gemma, "get_config", get_config)
    monkeypatch.setattr(gemma, "PALIGEMMA_VOCAB_SIZE", MODEL_CONFIG["paligemma_vocab_size"])


@pytest.fixture(scope="module")
def golden():
    with np.load(FIXTURE / "golden_llm.npz") as data:
        return dict(data)


def _fixture_lora() -> ResolvedLoRA:
    cfg = MODEL_CONFIG["pi0_config"]
    model = pi0_config.Pi0Config(
        paligemma_variant=cfg["paligemma_variant"], action_expert_variant=cfg["action_expert_variant"]
    )
    return openpi_configs.lora_from_model(model)


def _run_llm(llm_params, variants, golden) -> list[np.ndarray]:
    """golden_llm.json's `equivalent_linen_call`."""
    module = gemma.Module(configs=[gemma.get_config(v) for v in variants], embed_dtype="float32")
    embedded = [jnp.asarray(golden["embedded_0"]), jnp.asarray(golden["embedded_1"])]
    outs, _ = module.apply(
        {"params": llm_params}, embedded, jnp.asarray(golden["positions"]), jnp.asarray(golden["mask"])
    )
    return [np.asarray(o) for o in outs]


def _flat(params) -> dict[str, np.ndarray]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def _check_golden_gap(golden):
    # The adapters move the outputs far beyond any tolerance used below, so a merge that loses them fails.
    for i in range(2):
        assert rel_err(golden[f"out_{i}_base"], golden[f"out_{i}"]) > 1e-2


def test_harness_reproduces_goldens(fixture_variants, golden):
    """The linen call above, on the unmerged checkpoint, gives the goldens (so the merged checks mean something)."""
    params = _model.restore_params(FIXTURE_STEP / "params", restore_type=np.ndarray)
    llm = params["PaliGemma"]["llm"]
    with_lora = _run_llm(llm, ["fx_lora_a", "fx_lora_b"], golden)
    base_llm = traverse_util.unflatten_dict(
        {k: v for k, v in traverse_util.flatten_dict(llm).items() if not any("lora" in p for p in k)}
    )
    without_lora = _run_llm(base_llm, ["fx_a", "fx_b"], golden)
    for i in range(2):
        assert rel_err(with_lora[i], golden[f"out_{i}"]) < 1e-6
        assert rel_err(without_lora[i], golden[f"out_{i}_base"]) < 1e-6
    _check_golden_gap(golden)


def test_lora_from_model_reads_fixture_variants(fixture_variants):
    resolved = _fixture_lora()
    for index, name in enumerate(("fx_lora_a", "fx_lora_b")):
        for kind in ("attn", "ffn"):
            want = MODEL_CONFIG["gemma_variants"][name]["lora_configs"][kind]
            spec = resolved.experts[index].get(kind)
            assert (spec.rank, spec.alpha, spec.rslora) == (want["rank"], want["alpha"], want["rslora"])


def test_merged_checkpoint_reproduces_golden_llm(fixture_variants, golden, tmp_path):
    step = tmp_path / "checkpoint" / "2"
    shutil.copytree(FIXTURE_STEP, step)
    result = checkpoint_merge.merge_checkpoint(step, output=tmp_path / "merged", lora=_fixture_lora())

    merged = _model.restore_params(result.output / "params", restore_type=np.ndarray)
    original = _flat(_model.restore_params(FIXTURE_STEP / "params", restore_type=np.ndarray))
    flat = _flat(merged)
    assert not [p for p in flat if "lora" in p]
    assert set(flat) == {p for p in original if "lora" not in p}
    adapted = {p.removesuffix("_lora_a").removesuffix("/lora_a") for p in original if p.endswith("lora_a")}
    adapted = {p if p.split("/")[-2].startswith("mlp") else f"{p}/w" for p in adapted}
    assert len(adapted) == 10
    for path, value in flat.items():
        # Merged weights are float32; every other leaf is exactly what was saved (bf16 base, fp32 rest).
        assert value.dtype == (np.float32 if path in adapted else original[path].dtype), path
        if path not in adapted:
            np.testing.assert_array_equal(value, original[path])

    outs = _run_llm(merged["PaliGemma"]["llm"], ["fx_a", "fx_b"], golden)
    for i in range(2):
        assert rel_err(outs[i], golden[f"out_{i}"]) < F32_TOL, (i, rel_err(outs[i], golden[f"out_{i}"]))
    _check_golden_gap(golden)


# bf16 keeps 8 significant bits: rounding each merged weight (base + delta) to bf16 changes it by up to 2^-9 ~ 2e-3
# of its size, and through 3 layers of attention, gated MLP and RMSNorm those roundings add up to a few 1e-3 of the
# output (the fixture README expects ~5e-3). That is still far below the adapters' own effect (> 1e-2, checked).
@pytest.mark.parametrize(("output_dtype", "tolerance"), [("float32", F32_TOL), ("bfloat16", 1e-2)])
def test_merge_params_reproduces_golden_llm(fixture_variants, golden, output_dtype, tolerance):
    params = _model.restore_params(FIXTURE_STEP / "params", restore_type=np.ndarray)
    result = merge_params(params, _fixture_lora(), MergeOptions(output_dtype=output_dtype))
    merged_w = result.params["PaliGemma"]["llm"]["layers"]["attn"]["q_einsum"]["w"]
    assert np.dtype(merged_w.dtype) == np.dtype(output_dtype)
    outs = _run_llm(result.params["PaliGemma"]["llm"], ["fx_a", "fx_b"], golden)
    for i in range(2):
        err = rel_err(outs[i], golden[f"out_{i}"])
        assert err < tolerance, (i, err)
        assert rel_err(golden[f"out_{i}_base"], golden[f"out_{i}"]) > 2 * tolerance


def test_serving_twin_of_a_shipped_lora_config_uses_openpi_s_own_plain_variants():
    from openpi_merge_plugin.serving import twins

    twin = twins.serving_twin(openpi_config.get_config("pi0_libero_low_mem_finetune"))
    assert twin.reason is None
    assert twin.config.name == "pi0_libero_low_mem_finetune_merged"
    assert (twin.config.model.paligemma_variant, twin.config.model.action_expert_variant) == ("gemma_2b", "gemma_300m")
    fast = twins.serving_twin(openpi_config.get_config("pi0_fast_libero_low_mem_finetune"))
    assert fast.config.model.paligemma_variant == "gemma_2b"
