"""The PyTorch export served by openpi's own PyTorch model (needs upstream openpi, torch and openpi's patched
transformers; skipped otherwise).

pi0 and pi0.5 LoRA steps trained with openpi's scripts/train.py (tests/openpi_support/user_variants.py) are exported,
loaded strictly into `PI0Pytorch` by `create_trained_policy`, and their `sample_actions`, with fixed noise, are
compared with the JAX LoRA model's. Every kind of source (a LoRA step, its merge, a full fine-tune's train step with
EMA, a released base checkpoint, their params/; tests/data/openpi-15a9616) is exported and loaded strictly into a
PI0Pytorch built with its dims; an openpi config is read for an export without building its data config. As in the JAX tests, SigLIP is shrunk in this process (the JAX side by
`run_openpi_script`, the PyTorch side here, to the same sizes), and PI0Pytorch's multimodal projector, hard-coded to
gemma_2b's width 2048, is given the tiny paligemma's width: both only make a CPU test fast; the LLM, which carries
the adapters, is untouched.
"""

import dataclasses
import json
import pathlib
import shutil

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
from openpi_merge_plugin.formats.base import ExportOptions  # noqa: E402
from openpi_merge_plugin.options import MergeOptions  # noqa: E402
from openpi_merge_plugin.pipeline import checkpoint_merge  # noqa: E402
from openpi_merge_plugin.pipeline import export  # noqa: E402
from openpi_merge_plugin.pipeline import model_facts  # noqa: E402

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
    offline = export.export(step / "merged", "pytorch", output=tmp_path / "offline", config=name)
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
    options = ExportOptions(precision=precision)
    return export.export(step / "merged", "pytorch", output=_beside(step, name), options=options, config=config).output


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
    base_export = export.export(
        _base_merged(step, name),
        "pytorch",
        output=_beside(step, "pytorch_base_bf16"),
        options=ExportOptions(precision="bfloat16"),
        config=serving,
    ).output
    base_torch = _torch_actions(_served_pytorch_model(serving, base_export), obs, noise)
    scale = float(np.max(np.abs(want)))
    merged_gap = float(np.max(np.abs(got - want))) / scale
    base_gap = float(np.max(np.abs(base_torch - base_jax))) / scale
    print(
        f"{name} bfloat16, max |diff| / action scale: export of the merge {merged_gap:.4f}, of the base {base_gap:.4f}"
    )
    assert merged_gap <= 2 * base_gap  # and far below what the adapters change (tested in float32)


DATA = pathlib.Path(__file__).resolve().parent / "data" / "openpi-15a9616"
EXPORT_TINY = json.loads((DATA / "export-tiny" / "fixtures.json").read_text())
LORA_TINY = json.loads((DATA / "lora-tiny" / "model_config.json").read_text())
LORA_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "lora_tiny_fixture.json"
_GEMMA = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")


def _tiny_pi0pytorch(monkeypatch, *, pi05: bool, variants: dict, siglip: dict, vocab: int):
    """PI0Pytorch (float32) built with a fixture's dims: its gemma variants, SigLIP, vocabulary, and the projector at
    the paligemma's width (upstream hard-codes 2048)."""
    from openpi.models import gemma
    from openpi.models import pi0_config
    from openpi.models_pytorch import pi0_pytorch
    import transformers

    original = gemma.get_config
    monkeypatch.setattr(gemma, "get_config", lambda v: gemma.Config(**variants[v]) if v in variants else original(v))
    # transformers' own classes (this module's `tiny_pytorch_siglip` wraps gemma_pytorch's with other sizes)
    build_vlm, build_expert = transformers.PaliGemmaForConditionalGeneration, transformers.GemmaForCausalLM

    def vlm(config):
        vision = config.vision_config
        vision.hidden_size, vision.intermediate_size = siglip["width"], siglip["mlp_dim"]
        vision.num_hidden_layers, vision.num_attention_heads = siglip["depth"], siglip["num_heads"]
        vision.patch_size = siglip["patch_size"][0]
        vision.projection_dim = config.text_config.hidden_size
        config.text_config.vocab_size = vocab
        return build_vlm(config=config)

    def expert(config):
        config.vocab_size = vocab
        return build_expert(config=config)

    monkeypatch.setattr(gemma_pytorch, "PaliGemmaForConditionalGeneration", vlm)
    monkeypatch.setattr(gemma_pytorch, "GemmaForCausalLM", expert)
    paligemma, action_expert = variants
    config = pi0_config.Pi0Config(
        pi05=pi05,
        paligemma_variant=paligemma,
        action_expert_variant=action_expert,
        dtype="float32",
        pytorch_compile_mode=None,
    )
    return pi0_pytorch.PI0Pytorch(config)


def _sources(tmp_path: pathlib.Path) -> dict[str, tuple[pathlib.Path, list[str], dict]]:
    """Every kind of source (a private copy), its export flags, and the dims of its model."""
    step = tmp_path / "lora" / "2"
    shutil.copytree(DATA / "lora-tiny" / "checkpoint" / "2", step)
    merged = checkpoint_merge.merge_checkpoint(step, lora=checkpoint_merge.LoRASource(lora_config=LORA_CONFIG)).output
    lora_variants = LORA_TINY["gemma_variants"]
    lora_dims = {
        "pi05": False,
        "variants": {v: {k: lora_variants[v][k] for k in _GEMMA} for v in ("fx_lora_a", "fx_lora_b")},
        "siglip": LORA_TINY["siglip_variant_patch"],
        "vocab": LORA_TINY["paligemma_vocab_size"],
    }
    out = {"lora_step": (step, ["--lora-config", str(LORA_CONFIG)], lora_dims), "merged": (merged, [], lora_dims)}
    for name, record in EXPORT_TINY.items():
        shutil.copytree(DATA / "export-tiny" / name, tmp_path / name)
        checkpoint = tmp_path / record["checkpoint"]
        model = record["model_config"]
        dims = {
            "pi05": model["pi05"],
            "variants": {
                v: {k: model["variants"][v][k] for k in _GEMMA}
                for v in (model["paligemma_variant"], model["action_expert_variant"])
            },
            "siglip": record["siglip"],
            "vocab": record["vocab"],
        }
        out[name] = (checkpoint, [], dims)
        out[f"{name}/params"] = (checkpoint / "params", [], dims)
    return out


@pytest.mark.openpi_ci
def test_every_kind_of_source_loads_strictly_into_pi0pytorch(tmp_path, monkeypatch):
    """Exported as the command line does (no config: the model from the params), loaded by safetensors'
    `load_model(strict=True)` (every parameter present, the same shapes, nothing left over), as openpi's
    `load_pytorch` loads it, into a PI0Pytorch built with the source's dims; every parameter is the file's."""
    import safetensors
    import safetensors.torch

    from openpi_merge_plugin.cli import app as cli

    for kind, (src, flags, dims) in _sources(tmp_path).items():
        out = tmp_path / f"export-{kind.replace('/', '-')}"
        argv = ["export", str(src), "--output", str(out), "--allow-nonstandard-dims", "--model-dtype", "float32"]
        assert cli.main([*argv, "--no-progress", *flags]) == 0, kind
        with monkeypatch.context() as patch:
            model = _tiny_pi0pytorch(patch, **dims)
        safetensors.torch.load_model(model, str(out / "model.safetensors"), strict=True)
        state = model.state_dict()
        with safetensors.safe_open(str(out / "model.safetensors"), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
                assert torch.equal(state[name], f.get_tensor(name)), (kind, name)
        print(f"{kind}: {len(state)} parameters loaded strictly into PI0Pytorch")


def test_an_openpi_config_is_read_and_never_built(tmp_path, monkeypatch):
    """`--config` of a config whose data config downloads the tokenizer when created (LeRobot LIBERO): the export
    reads its model config and asset_id, and builds nothing (every data config's `create`, openpi's tokenizers and
    its download fail the test if called)."""
    from openpi.models import gemma
    from openpi.models import pi0_config
    from openpi.models import tokenizer
    from openpi.shared import download

    def refuse(*args, **kwargs):
        raise AssertionError("built: the export must read the config, not create its data config")

    factories, todo = set(), [openpi_config.DataConfigFactory]
    while todo:
        cls = todo.pop()
        factories.add(cls)
        todo += cls.__subclasses__()
    for cls in factories:
        for method in ("create", "create_base_config"):
            if method in vars(cls):
                monkeypatch.setattr(cls, method, refuse)
    monkeypatch.setattr(tokenizer.PaligemmaTokenizer, "__init__", refuse)
    monkeypatch.setattr(tokenizer.FASTTokenizer, "__init__", refuse)
    monkeypatch.setattr(download, "maybe_download", refuse)

    facts = model_facts.from_openpi("pi0_libero_low_mem_finetune")
    assert (facts.asset_id, facts.action_horizon, facts.max_token_len) == ("physical-intelligence/libero", 50, 48)
    assert facts.variants == ("gemma_2b_lora", "gemma_300m_lora")

    record = EXPORT_TINY["pi05_full_ema"]
    variants = record["model_config"]["variants"]
    original = gemma.get_config
    monkeypatch.setattr(gemma, "get_config", lambda v: gemma.Config(**variants[v]) if v in variants else original(v))
    model = pi0_config.Pi0Config(
        pi05=True, paligemma_variant="tiny_wide", action_expert_variant="tiny_wide_expert", action_horizon=10
    )
    data = openpi_config.LeRobotLiberoDataConfig(
        repo_id="physical-intelligence/libero", assets=openpi_config.AssetsConfig(asset_id=record["asset_id"])
    )
    config = openpi_config.TrainConfig(name="tiny_libero", model=model, data=data)
    monkeypatch.setitem(openpi_config._CONFIGS_DICT, "tiny_libero", config)  # noqa: SLF001  (registered as users do)
    shutil.copytree(DATA / "export-tiny" / "pi05_full_ema", tmp_path / "run")
    step = tmp_path / "run" / "checkpoint" / "3"
    result = export.export(step, "lerobot", options=ExportOptions(allow_nonstandard_dims=True), config="tiny_libero")
    assert result.manifest["policy"]["action_horizon"] == 10  # the config's, not openpi's default
    assert result.manifest["source"]["norm_stats"] == f"assets/{record['asset_id']}/norm_stats.json"
    assert result.manifest["model_facts"] == {"model": "openpi config tiny_libero"}
