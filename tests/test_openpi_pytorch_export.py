"""The PyTorch export served by openpi's own PyTorch model (needs upstream openpi, torch and openpi's patched
transformers; skipped otherwise).

pi0 and pi0.5 LoRA steps trained with openpi's scripts/train.py (tests/openpi_support/user_variants.py) are exported,
loaded strictly into `PI0Pytorch` by `create_trained_policy`, and their `sample_actions`, with fixed noise, are
compared with the JAX LoRA model's. As in the JAX tests, SigLIP is shrunk in this process (the JAX side by
`run_openpi_script`, the PyTorch side here, to the same sizes), and PI0Pytorch's multimodal projector, hard-coded to
gemma_2b's width 2048, is given the tiny paligemma's width: both only make a CPU test fast; the LLM, which carries
the adapters, is untouched.
"""

import dataclasses
import json

import numpy as np
from openpi_support import gate
import pytest

openpi_config = gate.require_openpi(pytorch=True)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from openpi.models import model as _model  # noqa: E402
from openpi.models_pytorch import gemma_pytorch  # noqa: E402
from openpi.policies import policy_config  # noqa: E402
import run_openpi_script  # noqa: E402
import torch  # noqa: E402
import training  # noqa: E402

from openpi_merge_plugin.checkpoint import output as _output  # noqa: E402
from openpi_merge_plugin.options import MergeOptions  # noqa: E402
from openpi_merge_plugin.pipeline import checkpoint_merge  # noqa: E402
from openpi_merge_plugin.pipeline import pytorch_export  # noqa: E402

pytestmark = pytest.mark.openpi
TINY_SIGLIP = run_openpi_script._tiny_decode_variant("So400m/14")  # noqa: SLF001
# pi0: the shipped debug_lora (user_variants' my_pi0_lora uses qkv_einsum, which PI0Pytorch's layout has not).
CASES = {"pi0": "debug_lora", "pi05": "my_pi05_lora"}


@pytest.fixture(scope="module", autouse=True)
def tiny_pytorch_siglip():
    """PI0Pytorch with the same tiny SigLIP as the JAX model, and its projector at the paligemma's width."""
    original = gemma_pytorch.PaliGemmaForConditionalGeneration
    width, depth, mlp, heads, patch = (TINY_SIGLIP[k] for k in ("width", "depth", "mlp_dim", "num_heads", "patch_size"))

    def build(config):
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size, vision.num_hidden_layers = width, mlp, depth
        vision.num_attention_heads, vision.patch_size = heads, patch[0]
        vision.projection_dim = config.text_config.hidden_size
        return original(config=config)

    gemma_pytorch.PaliGemmaForConditionalGeneration = build  # run_openpi_script did the same to the layout
    yield
    gemma_pytorch.PaliGemmaForConditionalGeneration = original


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tmp_path_factory):
    """Trained with merge on save and the PyTorch export on save (merge_lora.export_pytorch)."""
    config = CASES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    training.train(base, config, "export", "--keep-period", "None", "--merge-lora.export-pytorch")
    return config, training.step_dir(base, config, "export", 9)


def test_training_writes_the_export_next_to_merged_as_the_offline_command_does(trained, tmp_path):
    name, step = trained
    on_save = step / "merged_pytorch"
    manifest = json.loads((on_save / "manifest.json").read_text())
    assert manifest["precision"] == "float32"
    assert manifest["output"] == str(on_save)
    assert manifest["files"] == _output.file_checksums(on_save)
    offline = pytorch_export.export_pytorch(
        step / "merged", output=tmp_path / "offline", model=pytorch_export.model_info_from_openpi(name)
    )
    assert (offline.output / "model.safetensors").read_bytes() == (on_save / "model.safetensors").read_bytes()
    assert (offline.output / "config.json").read_text() == (on_save / "config.json").read_text()


def _with_dtype(config, dtype: str):
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=dtype))


def _inputs(model_config):
    obs = jax.tree.map(lambda x: np.asarray(x[0]), model_config.fake_obs().to_dict())
    noise = np.random.default_rng(0).standard_normal((model_config.action_horizon, model_config.action_dim))
    return obs, noise.astype(np.float32)


def _jax_actions(config, params_dir, obs, noise) -> np.ndarray:
    model = dataclasses.replace(config.model, dtype="float32").load(
        _model.restore_params(params_dir, dtype=jnp.float32)
    )
    observation = _model.Observation.from_dict(jax.tree.map(lambda x: jnp.asarray(x)[None], obs))
    return np.asarray(model.sample_actions(jax.random.key(0), observation, noise=jnp.asarray(noise)[None]))[0]


def _pytorch_model(config, export_dir):
    """PI0Pytorch as openpi's `load_pytorch` loads it: built for `config.model` (float32 params for a float32 config)
    and filled strictly (`safetensors.torch.load_model`: every tensor present, same shapes, nothing left over)."""
    model = config.model.load_pytorch(config, str(export_dir / "model.safetensors"))
    return model.to("cpu").eval()


def _served_pytorch_model(config, export_dir):
    """PI0Pytorch as `create_trained_policy` serves it: loaded as above, then cast to bfloat16 but for a few params
    (`to_bfloat16_for_selected_params("bfloat16")`, whatever the config's dtype)."""
    policy = policy_config.create_trained_policy(config, export_dir, norm_stats={}, pytorch_device="cpu")
    return policy._model  # noqa: SLF001  (the loaded PI0Pytorch; called directly to skip the data transforms)


def _torch_actions(model, obs, noise) -> np.ndarray:
    batch = jax.tree.map(lambda x: torch.from_numpy(np.array(x))[None], obs)
    # float images go to PI0Pytorch channels-first, as its preprocessing expects ([-1, 1], like the JAX side's)
    batch["image"] = {k: v.permute(0, 3, 1, 2) for k, v in batch["image"].items()}
    observation = _model.Observation.from_dict(batch)
    with torch.no_grad():
        out = model.sample_actions("cpu", observation, noise=torch.from_numpy(noise)[None])
    return out.float().numpy()[0]


def _beside(step, name: str):
    """An output next to the run's steps: never inside the LoRA step (the export refuses that)."""
    return step.parents[1] / f"{step.parent.name}-{step.name}-{name}"


def _export(step, config, precision: str, name: str):
    return pytorch_export.export_pytorch(
        step / "merged",
        output=_beside(step, name),
        precision=precision,
        model=_info(config),
    ).output


def _info(config) -> pytorch_export.ModelInfo:
    m = config.model
    return pytorch_export.ModelInfo(
        m.paligemma_variant, m.action_expert_variant, m.action_horizon, model_dtype=m.dtype, pi05=m.pi05
    )


def _base_merged(step, name):
    """The base model as a merged checkpoint (strength 0: the frozen weights, in float32, no adapters)."""
    out = _beside(step, "base_merged")
    if not out.exists():
        checkpoint_merge.merge_checkpoint(
            step, output=out, lora=checkpoint_merge.LoRASource(config=name), options=MergeOptions(strength=0.0)
        )
    return out


@pytest.mark.openpi_ci
def test_float32_export_reproduces_the_jax_lora_model_within_1e_4(trained):
    """float32 everywhere: the float32 export, loaded strictly into a float32 PI0Pytorch as openpi's `load_pytorch`
    loads it (no cast), gives the JAX LoRA model's actions (float32 params and compute, same noise) to 1e-4 of the
    actions' scale. The served path (`create_trained_policy`, which casts PI0Pytorch to bfloat16) is judged below."""
    name, step = trained
    lora, serving = openpi_config.get_config(name), openpi_config.get_config(f"{name}_merged")
    serving_f32 = _with_dtype(serving, "float32")
    obs, noise = _inputs(lora.model)
    want = _jax_actions(lora, step / "params", obs, noise)
    model = _pytorch_model(serving_f32, _export(step, serving_f32, "float32", "pytorch_f32"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    got = _torch_actions(model, obs, noise)
    base = _jax_actions(serving, step / "params", obs, noise)  # the frozen weights without the adapters
    scale = float(np.max(np.abs(want)))
    gap, adapters = float(np.max(np.abs(got - want))) / scale, float(np.max(np.abs(base - want))) / scale
    print(
        f"{name} float32 export vs JAX LoRA, max |diff| / action scale: {gap:.2e} (the adapters change {adapters:.3f})"
    )
    assert gap <= 1e-4
    assert adapters >= 100 * gap  # the adapters matter far more: an export that lost them would be off by that


def test_bfloat16_export_is_as_close_as_a_non_lora_conversion(trained):
    """The served path: the bf16 export (upstream's precision rules: every tensor bf16 in the file) through
    `create_trained_policy` (PI0Pytorch cast to bf16 but for a few params), against the JAX LoRA model in float32, is as close as the conversion of a non-LoRA checkpoint of the same model (the base
    weights) is to its JAX model. That conversion is upstream's converter's: on the same params it writes the same
    bytes as the export (tests/test_pytorch_layout.py)."""
    name, step = trained
    lora, serving = openpi_config.get_config(name), openpi_config.get_config(f"{name}_merged")
    obs, noise = _inputs(lora.model)
    want = _jax_actions(lora, step / "params", obs, noise)
    got = _torch_actions(_served_pytorch_model(serving, _export(step, serving, "bfloat16", "pytorch_bf16")), obs, noise)
    base_jax = _jax_actions(serving, step / "params", obs, noise)
    base_export = pytorch_export.export_pytorch(
        _base_merged(step, name), output=_beside(step, "pytorch_base_bf16"), precision="bfloat16", model=_info(serving)
    ).output
    base_torch = _torch_actions(_served_pytorch_model(serving, base_export), obs, noise)
    scale = float(np.max(np.abs(want)))
    merged_gap = float(np.max(np.abs(got - want))) / scale
    base_gap = float(np.max(np.abs(base_torch - base_jax))) / scale
    print(
        f"{name} bfloat16, max |diff| / action scale: export of the merge {merged_gap:.4f}, of the base {base_gap:.4f}"
    )
    assert merged_gap <= 2 * base_gap  # and far below what the adapters change (tested in float32)
