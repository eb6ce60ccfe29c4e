"""Serving twins found by structure, on stand-in gemma / gemma_fast / config modules (runs without openpi).

The real thing, trained with openpi's `scripts/train.py` and served through `create_trained_policy` and
`scripts/serve_policy.py`, is tests/test_openpi_serving_twins.py.
"""

import dataclasses
import sys
import types
import typing

import flax.nnx as nnx
import ml_collections
import pytest

from openpi_merge_plugin.lora.adapters import ShapeDtype
from openpi_merge_plugin.lora.configs import ResolvedLoRA
from openpi_merge_plugin.pipeline import checkpoint_merge
from openpi_merge_plugin.serving import twins
from openpi_merge_plugin.serving import variants


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float


@dataclasses.dataclass(frozen=True)
class GemmaConfig:  # openpi.models.gemma.Config's shape
    width: int
    depth: int
    mlp_dim: int
    lora_configs: dict = dataclasses.field(default_factory=dict)


def _gemma_module() -> types.ModuleType:
    """A gemma module with openpi's `Variant` literal and `get_config`, holding user variants named off-convention."""
    module = types.ModuleType("openpi.models.gemma")
    table = {
        "my_small": GemmaConfig(8, 2, 16),
        "my_lora_small": GemmaConfig(8, 2, 16, {"attn": LoRAConfig(2, 4.0), "ffn": LoRAConfig(2, 2.0)}),
        "adapted_expert": GemmaConfig(4, 2, 8, {"attn": LoRAConfig(1, 1.0)}),
    }
    module.Variant = typing.Literal["my_small", "my_lora_small", "adapted_expert"]

    def get_config(variant):
        if variant not in table:
            raise ValueError(f"Unknown variant: {variant}")
        return table[variant]

    module.get_config = get_config
    return module


def _gemma_fast_module() -> types.ModuleType:
    """gemma_fast's shape: ml_collections ConfigDicts that carry their own name under `variant`."""
    module = types.ModuleType("openpi.models.gemma_fast")
    module.Variant = typing.Literal["fast_tuned"]

    def get_config(variant):
        if variant != "fast_tuned":
            raise ValueError(f"Unknown variant: {variant}")
        config = ml_collections.ConfigDict({"variant": variant, "width": 8, "depth": 2, "num_heads": 2})
        config.lora_configs = ml_collections.ConfigDict({"attn": LoRAConfig(2, 2.0)})
        return config

    module.get_config = get_config
    return module


class _TinyModel(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.proj = nnx.Linear(width, 3, rngs=rngs)


@dataclasses.dataclass(frozen=True)
class Pi0Config:  # the two gemma variant fields openpi's Pi0Config has
    paligemma_variant: str
    action_expert_variant: str

    def create(self, rng):
        width = sys.modules["openpi.models.gemma"].get_config(self.paligemma_variant).width
        return _TinyModel(width, nnx.Rngs(rng))


@dataclasses.dataclass(frozen=True)
class Pi0FASTConfig:
    paligemma_variant: str


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    model: typing.Any
    freeze_filter: typing.Any = None
    merge_lora_on_save: bool = True


@pytest.fixture
def openpi(monkeypatch):
    """Stand-in openpi modules in sys.modules: gemma, gemma_fast and training.config with two LoRA configs."""
    config = types.ModuleType("openpi.training.config")
    configs = [
        TrainConfig("my_pi0_lora", Pi0Config("my_lora_small", "adapted_expert")),
        TrainConfig("my_fast_lora", Pi0FASTConfig("fast_tuned")),
        TrainConfig("plain_pi0", Pi0Config("my_small", "my_small")),
    ]
    registry = {c.name: c for c in configs}
    config._CONFIGS_DICT = registry  # noqa: SLF001  (openpi's registry, which the serving lookup reads)

    def get_config(name):
        if name not in registry:
            raise ValueError(f"Config '{name}' not found.")
        return registry[name]

    config.get_config = get_config
    modules = {
        "openpi": types.ModuleType("openpi"),
        "openpi.models": types.ModuleType("openpi.models"),
        "openpi.models.gemma": _gemma_module(),
        "openpi.models.gemma_fast": _gemma_fast_module(),
        "openpi.training": types.ModuleType("openpi.training"),
        "openpi.training.config": config,
    }
    modules["openpi"].models, modules["openpi"].training = modules["openpi.models"], modules["openpi.training"]
    modules["openpi.models"].gemma = modules["openpi.models.gemma"]
    modules["openpi.models"].gemma_fast = modules["openpi.models.gemma_fast"]
    modules["openpi.training"].config = config
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    twins.patch_get_config(config)
    return types.SimpleNamespace(**{k.rsplit(".", 1)[-1]: v for k, v in modules.items()})


def test_a_registered_variant_with_the_same_structure_is_the_twin_whatever_its_name(openpi):
    assert variants.plain_twin(openpi.gemma, "my_lora_small") == "my_small"


def test_without_a_registered_twin_one_is_derived_and_registered(openpi):
    name = variants.plain_twin(openpi.gemma, "adapted_expert")
    assert name == "adapted_expert_merged"
    assert openpi.gemma.get_config(name) == GemmaConfig(4, 2, 8)
    assert name in typing.get_args(openpi.gemma.Variant)
    assert variants.plain_twin(openpi.gemma, "adapted_expert") == name  # idempotent
    with pytest.raises(ValueError, match="Unknown variant"):
        openpi.gemma.get_config("nonexistent")  # other names behave as before


def test_gemma_fast_twin_ignores_the_config_s_own_name(openpi):
    name = variants.plain_twin(openpi.gemma_fast, "fast_tuned")
    twin = openpi.gemma_fast.get_config(name)
    assert "lora_configs" not in twin
    assert twin.variant == name
    assert variants.structure(twin) == variants.structure(openpi.gemma_fast.get_config("fast_tuned"))


def test_a_derived_name_taken_by_another_structure_is_an_error_not_a_wrong_twin(openpi):
    original = openpi.gemma.get_config

    def get_config(variant):
        return GemmaConfig(99, 1, 1) if variant == "adapted_expert_merged" else original(variant)

    openpi.gemma.get_config = get_config
    with pytest.raises(variants.VariantError, match="taken by a variant of another structure"):
        variants.plain_twin(openpi.gemma, "adapted_expert")


def test_serving_config_of_each_model_resolves_by_name(openpi):
    pi0 = openpi.config.get_config("my_pi0_lora_merged")
    assert (pi0.model.paligemma_variant, pi0.model.action_expert_variant) == ("my_small", "adapted_expert_merged")
    assert (pi0.merge_lora_on_save, pi0.freeze_filter) == (False, nnx.Nothing())
    fast = openpi.config.get_config("my_fast_lora_merged")
    assert fast.model.paligemma_variant == "fast_tuned_merged"
    with pytest.raises(ValueError, match="No serving twin: config plain_pi0 uses no LoRA variant"):
        openpi.config.get_config("plain_pi0_merged")
    with pytest.raises(ValueError, match="Config 'nothing_merged' not found"):
        openpi.config.get_config("nothing_merged")


def _resolved(name: str) -> ResolvedLoRA:
    return ResolvedLoRA(experts={}, source=f"openpi config {name}", config_name=name)


def test_merge_records_the_twin_only_when_it_loads_the_merged_params(openpi):
    fits = {"proj/kernel": ShapeDtype((8, 3), "float32"), "proj/bias": ShapeDtype((3,), "float32")}
    assert checkpoint_merge.serving_for(_resolved("my_pi0_lora"), fits).to_json() == {
        "serving_config": "my_pi0_lora_merged",
        "serving_config_reason": None,
    }
    wrong = {"proj/kernel": ShapeDtype((4, 3), "float32")}
    serving = checkpoint_merge.serving_for(_resolved("my_pi0_lora"), wrong)
    assert serving.name is None
    assert "cannot load the merged params" in serving.reason
    assert "1 params of the model are not in the checkpoint" in serving.reason
    assert "proj/kernel: model [8, 3], checkpoint [4, 3]" in serving.reason
    assert serving.describe().startswith("no serving config: my_pi0_lora_merged cannot load")


def test_no_serving_config_without_a_twin_and_the_reason_says_why(openpi):
    serving = checkpoint_merge.serving_for(_resolved("plain_pi0"), {})
    assert serving.name is None
    assert "get_config('plain_pi0_merged') fails" in serving.reason
    assert "uses no LoRA variant" in serving.reason


def test_a_run_whose_model_differs_from_the_registered_config_gets_no_serving_config(openpi):
    run = TrainConfig("my_pi0_lora", Pi0Config("my_lora_small", "my_lora_small"))  # overridden on the command line
    serving = twins.check("my_pi0_lora", {"proj/kernel": ShapeDtype((8, 3), "float32")}, run)
    assert serving.name is None
    assert "whose model differs from this run's" in serving.reason


def test_without_openpi_the_reason_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "openpi.training.config", None)  # import fails
    serving = checkpoint_merge.serving_for(_resolved("my_pi0_lora"), {"w": ShapeDtype((1,), "float32")})
    assert serving.name is None
    assert serving.reason.startswith("openpi is not importable here")
