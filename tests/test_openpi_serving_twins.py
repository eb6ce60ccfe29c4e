"""Serving twins of user-named LoRA variants, for pi0, pi0.5 and pi0-FAST, trained with openpi's scripts/train.py.

Each case trains one of `openpi_support/user_variants.py`'s configs (variants named outside openpi's `X_lora`
convention, registered after openpi's import) with `merge_lora_on_save`, then serves the merged step with the
config its manifest names, three ways: float32 params and compute; bfloat16 through openpi's own
`create_trained_policy`; and openpi's `scripts/serve_policy.py` in a fresh process. Needs upstream openpi.
"""

import dataclasses
import json
import pathlib

from helpers import rel_err
import numpy as np
from openpi_support import gate
import pytest

openpi_config = gate.require_openpi()
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from openpi.models import model as _model  # noqa: E402
from openpi.models import pi0_fast  # noqa: E402
from openpi.policies import policy_config  # noqa: E402
import run_openpi_script  # noqa: E402,F401  (the same tiny SigLIP and user variants in this process)
import training  # noqa: E402

pytestmark = pytest.mark.openpi


@dataclasses.dataclass(frozen=True)
class Case:
    config: str
    twin_variants: tuple[str, ...]  # the serving config's gemma variants, per expert
    flags: tuple[str, ...] = ()
    devices: int = 1


CASES = {
    # alpha != rank, rsLoRA, qkv_einsum, EMA (the EMA params are what gets saved), FSDP over 2 devices (fake CPU
    # devices; see training.env for why not more on a 2-core machine)
    "pi0": Case("my_pi0_lora", ("my_small", "my_lora_expert_merged"), ("--fsdp-devices", "2", "--ema-decay", "0.9"), 2),
    "pi05": Case("my_pi05_lora", ("dummy", "tiny_lora_expert_merged")),
    "pi0_fast": Case("my_pi0_fast_lora", ("fast_lora_tiny_merged",)),
}
STEP = 9


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    case = CASES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    training.train(base, case.config, "twin", "--keep-period", "None", *case.flags, devices=case.devices)
    step = training.step_dir(base, case.config, "twin", STEP)
    manifest = json.loads((step / "merged" / "manifest.json").read_text())
    return case, base, step, manifest


def _observation(model_config) -> dict[str, np.ndarray]:
    return jax.tree.map(lambda x: np.asarray(x[0]), model_config.fake_obs().to_dict())


def _noise(model_config) -> np.ndarray:
    shape = (model_config.action_horizon, model_config.action_dim)
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _float32_model(config, params_dir: pathlib.Path):
    model_config = dataclasses.replace(config.model, dtype="float32")
    return model_config.load(_model.restore_params(params_dir, dtype=jnp.float32))


def _batched(obs: dict) -> _model.Observation:
    return _model.Observation.from_dict(jax.tree.map(lambda x: jnp.asarray(x)[None], obs))


def _actions(model, obs: dict, noise: np.ndarray) -> np.ndarray:
    return np.asarray(model.sample_actions(jax.random.key(0), _batched(obs), noise=jnp.asarray(noise)[None]))[0]


def _prefix_logits(model, obs: dict) -> np.ndarray:
    """pi0-FAST's logits over the whole prefix (images and prompt), as sample_actions computes them, in float32."""
    observation = _model.preprocess_observation(None, _batched(obs), train=False, image_keys=list(obs["image"]))
    embeddings, mask, ar_mask = model.embed_inputs(observation)
    pre_logits, _, _ = model.PaliGemma.llm(
        embedded_prefix=embeddings, mask=pi0_fast.make_attn_mask(mask, ar_mask), return_prelogits=True
    )
    logits, _ = model.PaliGemma.llm(pre_logits=pre_logits)
    return np.asarray(logits, dtype=np.float32)[0]


def _dist(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


@pytest.mark.openpi_ci
def test_manifest_names_a_serving_config_that_resolves_to_the_structural_twin(trained):
    case, _, step, manifest = trained
    assert (manifest["serving_config"], manifest["serving_config_reason"]) == (f"{case.config}_merged", None)
    serving = openpi_config.get_config(manifest["serving_config"])
    fields = ("paligemma_variant", "action_expert_variant")[: len(case.twin_variants)]
    assert tuple(getattr(serving.model, f) for f in fields) == case.twin_variants
    lora = openpi_config.get_config(case.config)
    assert dataclasses.replace(serving.model, **{f: getattr(lora.model, f) for f in fields}) == lora.model
    assert manifest["source"]["step"] == STEP
    assert (step / "merged" / "params").is_dir()


@pytest.mark.openpi_ci
def test_float32_serving_matches_the_lora_model(trained):
    case, _, step, manifest = trained
    lora_config, serving = openpi_config.get_config(case.config), openpi_config.get_config(manifest["serving_config"])
    models = {
        "lora": _float32_model(lora_config, step / "params"),
        "merged": _float32_model(serving, step / "merged" / "params"),
        "base": _float32_model(serving, step / "params"),  # the frozen weights, without the adapters
    }
    obs = _observation(lora_config.model)
    if isinstance(lora_config.model, pi0_fast.Pi0FASTConfig):
        out = {k: _prefix_logits(m, obs) for k, m in models.items()}
    else:
        noise = _noise(lora_config.model)
        out = {k: _actions(m, obs, noise) for k, m in models.items()}
    assert rel_err(out["merged"], out["lora"]) <= 1e-4
    assert rel_err(out["base"], out["lora"]) >= 0.05  # the adapters matter: a merge that dropped them would fail


def test_bfloat16_policy_matches_the_lora_policy_within_2_percent_of_what_lora_changes(trained):
    """Through `create_trained_policy` (bf16 params): merged vs LoRA, against the base model (the serving config on
    the LoRA step: the frozen weights without adapters) vs LoRA."""
    case, _, step, manifest = trained
    lora_config, serving = openpi_config.get_config(case.config), openpi_config.get_config(manifest["serving_config"])
    policies = {
        "lora": policy_config.create_trained_policy(lora_config, step),
        "merged": policy_config.create_trained_policy(serving, step / "merged"),
        "base": policy_config.create_trained_policy(serving, step),
    }
    obs = _observation(lora_config.model)
    if isinstance(lora_config.model, pi0_fast.Pi0FASTConfig):
        # Tokens are what the policy serves; the bf16 prefix logits show how close the two models are.
        tokens = {k: p.infer(obs)["actions"] for k, p in policies.items()}
        assert np.array_equal(tokens["merged"], tokens["lora"])
        out = {k: _prefix_logits(p._model, obs) for k, p in policies.items()}  # noqa: SLF001
    else:
        noise = _noise(lora_config.model)
        out = {k: p.infer(obs, noise=noise)["actions"] for k, p in policies.items()}
    assert _dist(out["merged"], out["lora"]) <= 0.02 * _dist(out["base"], out["lora"])


def test_serve_policy_serves_the_merged_step_in_a_fresh_process(trained):
    """openpi's scripts/serve_policy.py, unmodified, with the manifest's config; the user variants are registered
    after openpi's import, as a user's launcher does. Its first answer is the in-process policy's first one (same
    noise), up to bfloat16 rounding: XLA's CPU reductions need not run in the same order in two processes."""
    _, base, step, manifest = trained
    serving = openpi_config.get_config(manifest["serving_config"])
    obs = _observation(serving.model)
    want = policy_config.create_trained_policy(serving, step / "merged").infer(obs)["actions"]
    with training.serve_policy(base, manifest["serving_config"], step / "merged") as client:
        got = client.infer(obs)["actions"]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * float(np.max(np.abs(want))))
