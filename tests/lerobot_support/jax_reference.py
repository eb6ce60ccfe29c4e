"""openpi's side of the LeRobot comparison (runs where openpi runs): a fixed observation, and what openpi's own JAX
models compute on it, saved for `lerobot_check.py` to compare against in LeRobot's Python.

pi0 / pi0.5: `sample_actions` of the LoRA model and of the base model (the same step's frozen weights, no adapters),
float32 params and compute, fixed noise. pi0-FAST: the prefix logits that `Pi0FAST.sample_actions` decodes its first
token from, and its greedy tokens. Token ids are fed directly (the tokenizers are on an unreachable hub): openpi's
layout, BOS (2) first, then random ids, then padding.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from openpi.models import gemma
from openpi.models import gemma_fast
from openpi.models import model as _model
from openpi.models import pi0_fast
from openpi.shared import normalize
import openpi.transforms as transforms
import run_openpi_script

PALIGEMMA_BOS = 2
VALID_TOKENS = 12  # prompt tokens that are not padding
GREEDY_STEPS = 16
SEED = 0


def is_fast(model_config) -> bool:
    return isinstance(model_config, pi0_fast.Pi0FASTConfig)


def observation(model_config) -> dict[str, np.ndarray]:
    """A fixed observation of the model's input spec (batch 1): images in [-1, 1], a normal state, a prompt of
    VALID_TOKENS ids (BOS first) then padding; for pi0-FAST no action tokens (ar mask 0), as at inference."""
    rng = np.random.default_rng(SEED)
    spec, _ = model_config.inputs_spec(batch_size=1)
    obs = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), spec.to_dict())
    obs["image"] = {k: rng.uniform(-1, 1, v.shape).astype(np.float32) for k, v in obs["image"].items()}
    obs["image_mask"] = {k: np.ones_like(v) for k, v in obs["image_mask"].items()}
    obs["state"] = rng.standard_normal(obs["state"].shape).astype(np.float32)
    vocab = dims(model_config)["paligemma"]["vocab_size"]
    tokens = np.zeros_like(obs["tokenized_prompt"])
    tokens[0, 0] = PALIGEMMA_BOS
    tokens[0, 1:VALID_TOKENS] = rng.integers(3, vocab, VALID_TOKENS - 1)
    obs["tokenized_prompt"] = tokens
    obs["tokenized_prompt_mask"] = np.arange(tokens.shape[1])[None] < VALID_TOKENS
    return obs


def noise(model_config) -> np.ndarray:
    shape = (1, model_config.action_horizon, model_config.action_dim)
    return np.random.default_rng(SEED + 1).standard_normal(shape).astype(np.float32)


def dims(model_config) -> dict:
    """The dimensions LeRobot's policies must be built with to hold these weights (its configs name only gemma_2b /
    gemma_300m and hard-code SigLIP So400m/14 and the projector)."""
    keys = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
    if is_fast(model_config):
        c = gemma_fast.get_config(model_config.paligemma_variant)
        out = {"paligemma": {k: c[k] for k in keys} | {"vocab_size": c["vocab_size"]}}
    else:
        c = gemma.get_config(model_config.paligemma_variant)
        e = gemma.get_config(model_config.action_expert_variant)
        out = {
            "paligemma": {k: getattr(c, k) for k in keys} | {"vocab_size": gemma.PALIGEMMA_VOCAB_SIZE},
            "action_expert": {k: getattr(e, k) for k in keys},
        }
    siglip = run_openpi_script._tiny_decode_variant("So400m/14")  # noqa: SLF001  (the size the runs were trained at)
    out["siglip"] = {k: siglip[k] for k in ("width", "depth", "mlp_dim", "num_heads")} | {
        "patch_size": siglip["patch_size"][0]
    }
    out["projection_dim"] = out["paligemma"]["width"]
    return out


def _load(model_config, params_dir: pathlib.Path):
    model_config = dataclasses.replace(model_config, dtype="float32")
    return model_config.load(_model.restore_params(params_dir, dtype=jnp.float32))


def _observation(obs) -> _model.Observation:
    return _model.Observation.from_dict(jax.tree.map(jnp.asarray, obs))


def actions(model_config, params_dir: pathlib.Path, obs, noise_) -> np.ndarray:
    model = _load(model_config, params_dir)
    out = model.sample_actions(jax.random.key(0), _observation(obs), noise=jnp.asarray(noise_))
    return np.asarray(out)


def fast_outputs(model_config, params_dir: pathlib.Path, obs) -> dict[str, np.ndarray]:
    """Pi0FAST's prefix logits at the prompt's valid positions, in order (the prefill of `Pi0FAST.sample_actions`,
    its steps as openpi runs them; the last one decodes the first token), and `sample_actions`' greedy tokens."""
    model = _load(model_config, params_dir)
    observation = _model.preprocess_observation(
        None, _observation(obs), train=False, image_keys=list(obs["image"].keys())
    )
    embeddings, mask, ar_mask = model.embed_inputs(observation)
    attn_mask = pi0_fast.make_attn_mask(mask, ar_mask)
    embeddings, mask, attn_mask = pi0_fast.left_to_right_align(embeddings, mask, attn_mask)
    positions = jnp.cumsum(mask, axis=-1) - 1
    logits, _, _ = model.PaliGemma.llm(embedded_prefix=embeddings, mask=attn_mask, positions=positions, decode=True)
    valid = np.asarray(mask[0])
    tokens = model.sample_actions(jax.random.key(0), _observation(obs), max_decoding_steps=GREEDY_STEPS)
    return {"prefix_logits": np.asarray(logits[0])[valid], "greedy_tokens": np.asarray(tokens[0]).astype(np.int64)}


def normalized_state(norm_stats_dir: pathlib.Path, state: np.ndarray) -> dict[str, np.ndarray]:
    """openpi's `transforms.Normalize` of `state` with the step's norm stats, z-score and quantile."""
    stats = normalize.load(norm_stats_dir)
    return {
        f"normalized_state_{mode}": transforms.Normalize(stats, use_quantiles=quantiles)({"state": state})["state"]
        for mode, quantiles in (("mean_std", False), ("quantiles", True))
    }


def write(out_dir: pathlib.Path, lora_config, base_config, params_dir: pathlib.Path, norm_stats_dir: pathlib.Path):
    """Writes reference.npz (inputs and openpi's outputs) and reference.json (dims, kind) into `out_dir`."""
    model_config = lora_config.model
    obs = observation(model_config)
    arrays = {
        "images": np.stack([obs["image"][k] for k in obs["image"]]),
        "image_masks": np.stack([obs["image_mask"][k] for k in obs["image_mask"]]),
        "state": obs["state"],
        "tokens": obs["tokenized_prompt"].astype(np.int64),
        "token_mask": obs["tokenized_prompt_mask"],
    }
    state = np.linspace(-2.0, 3.0, model_config.action_dim).astype(np.float32)
    arrays["known_state"] = state
    arrays.update(normalized_state(norm_stats_dir, state))
    if is_fast(model_config):
        for name, config in (("lora", lora_config), ("base", base_config)):
            for k, v in fast_outputs(config.model, params_dir, obs).items():
                arrays[f"{k}_{name}"] = v
    else:
        arrays["noise"] = noise(model_config)
        arrays["actions_lora"] = actions(model_config, params_dir, obs, arrays["noise"])
        arrays["actions_base"] = actions(base_config.model, params_dir, obs, arrays["noise"])
    np.savez(out_dir / "reference.npz", **arrays)
    kind = "pi0_fast" if is_fast(model_config) else ("pi05" if model_config.pi05 else "pi0")
    meta = {"kind": kind, "dims": dims(model_config), "cameras": list(obs["image"]), "greedy_steps": GREEDY_STEPS}
    (out_dir / "reference.json").write_text(json.dumps(meta, indent=1))
    return arrays, meta
