"""LoRA variants and train configs of a user's own, registered after openpi's import the way users add them.

Importing this module (the tests and `run_openpi_script.py` do) wraps `gemma.get_config` / `gemma_fast.get_config`
with variants whose names follow no convention of openpi's, and adds three train configs to openpi's registry:

    my_pi0_lora       pi0: my_lora_small (one qkv_einsum: as many kv heads as heads; attn alpha != rank, FFN rsLoRA),
                      whose plain twin my_small is registered too, and my_lora_expert (no plain twin registered)
    my_pi05_lora      pi0.5 (adaRMS action expert): openpi's `dummy`, no LoRA, and tiny_lora_expert
    my_pi0_fast_lora  pi0-FAST: fast_lora_tiny (gemma_fast; no plain twin registered)

The adapters start large (normal, stddev 0.1) and train at a high learning rate, so that the LoRA model is far from
its base model and a merge that loses part of the adapters would show. The data is openpi's fake data with
identity-like norm stats for `state` under an asset id, so that `scripts/serve_policy.py` can serve the steps.
pi0.5 and pi0-FAST start from random LLM weights (`RandomLLMWeights`), as they would from a pretrained checkpoint.
"""

import dataclasses
import typing

import flax.linen as nn
import flax.traverse_util as traverse_util
import jax.numpy as jnp
import numpy as np
from openpi.models import gemma
from openpi.models import gemma_fast
from openpi.models import lora
from openpi.models import pi0_config
from openpi.models import pi0_fast
from openpi.shared import normalize
from openpi.training import optimizer
from openpi.training import weight_loaders
import openpi.training.config as _config

ASSET_ID = "fake_robot"
CONFIGS = ("my_pi0_lora", "my_pi05_lora", "my_pi0_fast_lora")


def _lora(rank: int, alpha: float, *, rslora: bool = False) -> lora.LoRAConfig:
    return lora.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, init_fn=nn.initializers.normal(stddev=0.1))


_GEMMA = {
    "my_small": gemma.Config(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=4, head_dim=16),
    "my_lora_small": gemma.Config(
        width=64,
        depth=2,
        mlp_dim=128,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        lora_configs={"attn": _lora(4, 16.0), "ffn": _lora(2, 2.0, rslora=True)},
    ),
    "my_lora_expert": gemma.Config(
        width=32,
        depth=2,
        mlp_dim=64,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        lora_configs={"attn": _lora(2, 3.0, rslora=True), "ffn": _lora(4, 1.0)},
    ),
    "tiny_lora_expert": gemma.Config(
        width=32,
        depth=4,
        mlp_dim=64,
        num_heads=8,
        num_kv_heads=1,
        head_dim=16,
        lora_configs={"attn": _lora(8, 32.0), "ffn": _lora(4, 8.0)},
    ),
}


# Built once: LoRAConfig's init_fn is a fresh closure per call, and openpi's init_train_state needs the model
# definition (which holds the config) to compare equal between its two traces.
_FAST_LORA = {"attn": _lora(4, 16.0), "ffn": _lora(4, 4.0)}


def _fast_lora_tiny():
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "variant": "fast_lora_tiny",
            "width": 64,
            "depth": 2,
            "mlp_dim": 128,
            "num_heads": 4,
            "num_kv_heads": 1,
            "head_dim": 16,
            "norm_eps": 1e-6,
            "vocab_size": 2048,
            "scan": True,
            "remat_policy": "nothing_saveable",
            "lora_configs": _FAST_LORA,
        }
    )


def _wrap(module, extra) -> None:
    original = module.get_config

    def get_config(variant):
        if variant in extra:
            return extra[variant]()
        return original(variant)

    module.get_config = get_config


_wrap(gemma, {name: (lambda c=c: dataclasses.replace(c)) for name, c in _GEMMA.items()})
_wrap(gemma_fast, {"fast_lora_tiny": _fast_lora_tiny})
# my_small is declared in Variant (so the plugin can find it as my_lora_small's twin); my_lora_expert's and
# tiny_lora_expert's twins are not registered anywhere: the plugin derives them.
gemma.Variant = typing.Literal[(*typing.get_args(gemma.Variant), "my_small", "my_lora_small", "my_lora_expert")]


@dataclasses.dataclass(frozen=True)
class FakeDataWithNormStats(_config.DataConfigFactory):
    """openpi's fake data, with norm stats for `state` (mean 0, std 1) saved under an asset id."""

    repo_id: str = "fake"

    def create(self, assets_dirs, model_config):
        stats = normalize.NormStats(mean=np.zeros(model_config.action_dim), std=np.ones(model_config.action_dim))
        return _config.DataConfig(repo_id="fake", asset_id=ASSET_ID, norm_stats={"state": stats})


@dataclasses.dataclass(frozen=True)
class RandomLLMWeights(weight_loaders.WeightLoader):
    """Stands in for a pretrained checkpoint: random LLM weights; the adapters keep their own init. openpi always
    loads these weights from a checkpoint and LoRA training keeps them frozen, but some initialise to zero: all of
    gemma_fast's (every logit would stay 0) and pi0.5's adaRMS projections (the residual gates would stay 0, so the
    action expert's layers, and their adapters, would do nothing)."""

    seed: int = 0

    def load(self, params):
        rng = np.random.default_rng(self.seed)
        flat = traverse_util.flatten_dict(params, sep="/")
        for path, leaf in flat.items():
            if path.startswith("PaliGemma/llm/") and "lora_" not in path:
                flat[path] = jnp.asarray(0.05 * rng.standard_normal(leaf.shape), dtype=leaf.dtype)
        return traverse_util.unflatten_dict(flat, sep="/")


def _train_config(name: str, model, **changes) -> _config.TrainConfig:
    return dataclasses.replace(
        _config.get_config("debug"),
        name=name,
        exp_name=name,
        model=model,
        freeze_filter=model.get_freeze_filter(),
        data=FakeDataWithNormStats(),
        lr_schedule=optimizer.CosineDecaySchedule(warmup_steps=2, peak_lr=3e-3, decay_steps=10, decay_lr=3e-4),
        save_interval=5,
        merge_lora_on_save=True,
        **changes,
    )


for _config_ in (
    _train_config(
        "my_pi0_lora", pi0_config.Pi0Config(paligemma_variant="my_lora_small", action_expert_variant="my_lora_expert")
    ),
    _train_config(
        "my_pi05_lora",
        pi0_config.Pi0Config(pi05=True, paligemma_variant="dummy", action_expert_variant="tiny_lora_expert"),
        weight_loader=RandomLLMWeights(),
    ),
    _train_config(
        "my_pi0_fast_lora",
        pi0_fast.Pi0FASTConfig(paligemma_variant="fast_lora_tiny", action_horizon=10, max_token_len=32),
        weight_loader=RandomLLMWeights(),
    ),
):
    if _config_.name not in _config._CONFIGS_DICT:  # noqa: SLF001
        _config._CONFIGS.append(_config_)  # noqa: SLF001
        _config._CONFIGS_DICT[_config_.name] = _config_  # noqa: SLF001
