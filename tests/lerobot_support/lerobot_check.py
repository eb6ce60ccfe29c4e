"""LeRobot's side of the comparison: loads `export --format lerobot` directories with LeRobot's own classes and
measures them against openpi's outputs (`jax_reference.py`). Runs in LeRobot's Python (lerobot 0.6.1), offline:

    HF_HUB_OFFLINE=1 LEROBOT_PYTHON tests/lerobot_support/lerobot_check.py REFERENCE_DIR MERGED_EXPORT BASE_EXPORT OUT

Writes OUT (JSON): per export, whether `<Policy>.from_pretrained(dir)`'s state dict equals the file's tensors (every
key, bitwise; LeRobot's loader only prints), what the loader printed, the processors' normalization of a known state
against openpi's; and the models' outputs (actions for pi0/pi0.5, prefix logits and greedy tokens for pi0-FAST)
against openpi's, as relative distances.

Offline measures: the tokenizers are the local stand-in of tests/data/lerobot-0.6.1/make_fixtures.py (token ids are
fed to the models directly, never tokenized); the models are built at the tiny runs' dimensions (`tiny_dims`).
"""

import contextlib
import importlib.util
import io
import json
import pathlib
import sys

import numpy as np
from safetensors.torch import load_file
import torch

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "data" / "lerobot-0.6.1" / "make_fixtures.py"
PALIGEMMA_EOS = 1
GEMMA_KEYS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")


def _fixture_tools():
    spec = importlib.util.spec_from_file_location("lerobot_fixtures", FIXTURES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _policy_class(kind: str):
    if kind == "pi0":
        from lerobot.policies.pi0 import modeling_pi0 as modeling

        return modeling.PI0Policy, modeling
    if kind == "pi05":
        from lerobot.policies.pi05 import modeling_pi05 as modeling

        return modeling.PI05Policy, modeling
    from lerobot.policies.pi0_fast import modeling_pi0_fast as modeling

    return modeling.PI0FastPolicy, modeling


@contextlib.contextmanager
def tiny_dims(modeling, config: dict, dims: dict):
    """LeRobot's modeling module builds the tiny runs' model: its `get_gemma_config` (which knows only gemma_2b /
    gemma_300m) returns the run's dims for the variant names in config.json, and PaliGemma is built with the run's
    SigLIP, projector width and vocabulary (LeRobot hard-codes So400m/14, 2048 and 257152)."""
    by_name = {config["paligemma_variant"]: dims["paligemma"]}
    if "action_expert" in dims:
        name = config["action_expert_variant"]
        if by_name.get(name, dims["action_expert"]) != dims["action_expert"]:
            raise ValueError(f"config.json names both models {name!r} but their dims differ: {dims}")
        by_name.setdefault(name, dims["action_expert"])
    original_config = modeling.get_gemma_config
    original_paligemma = modeling.PaliGemmaForConditionalGenerationWithPiGemma

    def get_gemma_config(variant):
        original_config(variant)  # still rejects the names LeRobot does not know
        return modeling.GemmaConfig(**{k: by_name[variant][k] for k in GEMMA_KEYS})

    def paligemma(config):
        vision, siglip = config.vision_config, dims["siglip"]
        vision.hidden_size, vision.num_hidden_layers = siglip["width"], siglip["depth"]
        vision.intermediate_size, vision.num_attention_heads = siglip["mlp_dim"], siglip["num_heads"]
        vision.patch_size, vision.projection_dim = siglip["patch_size"], dims["projection_dim"]
        config.text_config.vocab_size = dims["paligemma"]["vocab_size"]
        return original_paligemma(config=config)

    modeling.get_gemma_config = get_gemma_config
    modeling.PaliGemmaForConditionalGenerationWithPiGemma = paligemma
    try:
        yield
    finally:
        modeling.get_gemma_config = original_config
        modeling.PaliGemmaForConditionalGenerationWithPiGemma = original_paligemma


def load(kind: str, export: pathlib.Path, dims: dict):
    """`<Policy>.from_pretrained(export)` at the run's dims; returns the policy and what its loader printed."""
    policy_class, modeling = _policy_class(kind)
    config = json.loads((export / "config.json").read_text())
    printed = io.StringIO()
    with tiny_dims(modeling, config, dims), _fixture_tools()._offline_tokenizers(), contextlib.redirect_stdout(printed):  # noqa: SLF001
        policy = policy_class.from_pretrained(export)
    return policy.eval(), [line for line in printed.getvalue().splitlines() if line.strip()]


def state_dict_check(policy, export: pathlib.Path) -> dict:
    """The loaded state dict against the file's tensors: every key, dtype and value (bitwise)."""
    file = load_file(str(export / "model.safetensors"))
    loaded = policy.state_dict()
    common = sorted(set(file) & set(loaded))
    return {
        "file_tensors": len(file),
        "state_dict_tensors": len(loaded),
        "only_in_file": sorted(set(file) - set(loaded)),
        "only_in_state_dict": sorted(set(loaded) - set(file)),
        "dtype_differs": [k for k in common if file[k].dtype != loaded[k].dtype],
        "not_bitwise_equal": [k for k in common if not torch.equal(file[k], loaded[k].to(file[k].dtype))],
        "dtypes": sorted({str(v.dtype) for v in loaded.values()}),
    }


def normalization_check(policy, export: pathlib.Path, ref) -> dict:
    """The normalizer that `make_pre_post_processors(config, pretrained_path=export)` loads, applied to a known state,
    against openpi's `transforms.Normalize` of it in openpi's mode for the model (z-score for pi0, else quantiles)."""
    from lerobot.lerobot_types import TransitionKey
    from lerobot.policies.factory import make_pre_post_processors
    from lerobot.processor.converters import create_transition
    from lerobot.processor.normalize_processor import NormalizerProcessorStep
    from lerobot.processor.normalize_processor import UnnormalizerProcessorStep

    with _fixture_tools()._offline_tokenizers():  # noqa: SLF001
        pre, post = make_pre_post_processors(policy.config, pretrained_path=str(export))
    (normalizer,) = [s for s in pre.steps if isinstance(s, NormalizerProcessorStep)]
    (unnormalizer,) = [s for s in post.steps if isinstance(s, UnnormalizerProcessorStep)]
    state = torch.from_numpy(ref["known_state"])[None]
    out = normalizer(create_transition(observation={"observation.state": state}))
    got = out[TransitionKey.OBSERVATION]["observation.state"][0].numpy()
    mode = normalizer.norm_map[policy.config.input_features["observation.state"].type].value
    want = ref["normalized_state_mean_std" if mode == "MEAN_STD" else "normalized_state_quantiles"]
    return {
        "pre_steps": [type(s).__name__ for s in pre.steps],
        "post_steps": [type(s).__name__ for s in post.steps],
        "state_mode": mode,
        "action_mode": unnormalizer.norm_map[policy.config.output_features["action"].type].value,
        "max_abs_diff": float(np.max(np.abs(got - want))),
        "max_rel_diff": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
    }


def _inputs(ref):
    images = [torch.from_numpy(im).permute(0, 3, 1, 2) for im in ref["images"]]  # channels first, in [-1, 1]
    masks = [torch.from_numpy(m) for m in ref["image_masks"]]
    return images, masks, torch.from_numpy(ref["tokens"]), torch.from_numpy(ref["token_mask"])


@torch.no_grad()
def actions(kind: str, policy, ref) -> np.ndarray:
    images, img_masks, tokens, token_mask = _inputs(ref)
    noise = torch.from_numpy(ref["noise"])
    if kind == "pi0":
        state = torch.from_numpy(ref["state"])
        out = policy.model.sample_actions(images, img_masks, tokens, token_mask, state, noise=noise)
    else:
        out = policy.model.sample_actions(images, img_masks, tokens, token_mask, noise=noise)
    return out.float().numpy()


def _prompt_logits(model, images, img_masks, tokens, token_mask) -> torch.Tensor:
    """PI0FastPytorch's logits at the prompt's valid positions: its prefix-LM pass (embed_prefix_fast, positions
    cumsum - 1, lm_head), as `sample_actions_fast` runs it on its prompt."""
    from lerobot.policies.common.vla_utils import prepare_attention_masks_4d

    embs, pad_masks, att_masks, _, _ = model.embed_prefix_fast(images, img_masks, tokens, token_mask)
    (out, _), _ = model.paligemma_with_expert.forward(
        attention_mask=prepare_attention_masks_4d(att_masks, dtype=embs.dtype),
        position_ids=torch.cumsum(pad_masks, dim=1) - 1,
        past_key_values=None,
        inputs_embeds=[embs, None],
        use_cache=False,
        adarms_cond=[None, None],
    )
    return model.paligemma_with_expert.paligemma.lm_head(out)[0][pad_masks[0]]


@torch.no_grad()
def fast_outputs(policy, ref, steps: int) -> dict:
    """The prompt's logits; the logits LeRobot decodes its first token from (`sample_actions_fast` appends BOS to the
    prompt, in the prompt's bidirectional segment, and decodes from it); `sample_actions_fast`'s greedy tokens (the
    KV-cache variant needs the real tokenizer's "|" id); and the diagnosis `_greedy_without_bos`."""
    model = policy.model
    images, img_masks, tokens, token_mask = _inputs(ref)
    bos = torch.full((1, 1), policy.model._paligemma_tokenizer.bos_token_id)  # noqa: SLF001  (what LeRobot appends)
    with_bos = _prompt_logits(
        model,
        images,
        img_masks,
        torch.cat([tokens, bos], 1),
        torch.cat([token_mask, torch.ones_like(bos, dtype=bool)], 1),
    )
    greedy = model.sample_actions_fast(images, img_masks, tokens, token_mask, max_decoding_steps=steps)
    return {
        "prefix_logits": _prompt_logits(model, images, img_masks, tokens, token_mask).float().numpy(),
        "first_step_logits": with_bos[-1].float().numpy(),
        "greedy_tokens": greedy[0].numpy(),
        "greedy_tokens_without_bos": _greedy_without_bos(model, images, img_masks, tokens, token_mask, steps),
    }


def _greedy_without_bos(model, images, img_masks, tokens, token_mask, steps: int) -> np.ndarray:
    """A diagnosis, not LeRobot's decode: greedy decoding over PI0FastPytorch's own modules as openpi's Pi0FAST decodes
    (no BOS after the prompt; the first token from the prompt's last logit; step s at position prefill_len + s + 1),
    generated tokens as LeRobot's causal "fast" segment. Equal to openpi's tokens: the BOS is what differs."""
    from lerobot.policies.common.vla_utils import prepare_attention_masks_4d

    lm_head = model.paligemma_with_expert.paligemma.lm_head
    generated = []
    for _ in range(steps):
        fast = torch.tensor([generated], dtype=torch.long) if generated else None
        fast_mask = torch.ones_like(fast, dtype=torch.bool) if generated else None
        embs, pad_masks, att_masks, _, _ = model.embed_prefix_fast(
            images, img_masks, tokens, token_mask, fast_action_tokens=fast, fast_action_masks=fast_mask
        )
        n_prefix = embs.shape[1] - len(generated)
        prefix_pos = torch.cumsum(pad_masks[:, :n_prefix], dim=1) - 1
        prefill = int(pad_masks[0, :n_prefix].sum())
        decode_pos = prefill + 1 + torch.arange(len(generated))[None]
        positions = torch.cat([prefix_pos, decode_pos], dim=1)
        (out, _), _ = model.paligemma_with_expert.forward(
            attention_mask=prepare_attention_masks_4d(att_masks, dtype=embs.dtype),
            position_ids=positions,
            past_key_values=None,
            inputs_embeds=[embs, None],
            use_cache=False,
            adarms_cond=[None, None],
        )
        last = int(torch.nonzero(pad_masks[0])[-1])  # the last valid position (the prompt is right-padded)
        generated.append(int(torch.argmax(lm_head(out[0, last]), dim=-1)))
    return np.asarray(generated)


def _until_eos(tokens: np.ndarray) -> np.ndarray:
    """Up to and including the first EOS (1), where openpi's decoding stops (its later tokens stay 0)."""
    eos = np.flatnonzero(tokens == PALIGEMMA_EOS)
    return tokens[: eos[0] + 1] if eos.size else tokens


def _rel(a, b, scale) -> float:
    return float(np.max(np.abs(a - b)) / scale)


def main(reference_dir: pathlib.Path, merged: pathlib.Path, base: pathlib.Path, out: pathlib.Path) -> None:
    meta = json.loads((reference_dir / "reference.json").read_text())
    ref = dict(np.load(reference_dir / "reference.npz"))
    kind, dims = meta["kind"], meta["dims"]
    result = {"kind": kind, "exports": {}}
    outputs = {}
    for name, export in (("lora", merged), ("base", base)):
        policy, printed = load(kind, export, dims)
        result["exports"][name] = {
            "loader_printed": printed,
            "state_dict": state_dict_check(policy, export),
            "normalization": normalization_check(policy, export, ref),
        }
        outputs[name] = (
            actions(kind, policy, ref) if kind != "pi0_fast" else fast_outputs(policy, ref, meta["greedy_steps"])
        )
        del policy
    if kind == "pi0_fast":
        result["fast"] = {}
        for name in ("lora", "base"):
            want, got = ref[f"prefix_logits_{name}"], outputs[name]["prefix_logits"]
            openpi_tokens = _until_eos(ref[f"greedy_tokens_{name}"])
            result["fast"][name] = {
                "prefix_logits_rel_diff": _rel(got, want, np.max(np.abs(want))),
                "prefix_logits_scale": float(np.max(np.abs(want))),
                "first_step_logits_rel_diff": _rel(
                    outputs[name]["first_step_logits"], want[-1], np.max(np.abs(want[-1]))
                ),
                "last_prefix_argmax_lerobot": int(np.argmax(got[-1])),
                "last_prefix_argmax_openpi": int(np.argmax(want[-1])),
                "greedy_tokens_openpi": openpi_tokens.tolist(),
                "greedy_tokens_lerobot": outputs[name]["greedy_tokens"].tolist(),
                "greedy_tokens_equal": bool(np.array_equal(openpi_tokens, _until_eos(outputs[name]["greedy_tokens"]))),
                "greedy_tokens_without_bos": outputs[name]["greedy_tokens_without_bos"].tolist(),
                "greedy_tokens_without_bos_equal": bool(
                    np.array_equal(openpi_tokens, _until_eos(outputs[name]["greedy_tokens_without_bos"]))
                ),
            }
        result["fast"]["lora_vs_base_prefix_logits_rel"] = _rel(
            ref["prefix_logits_lora"], ref["prefix_logits_base"], np.max(np.abs(ref["prefix_logits_lora"]))
        )
    else:
        want = ref["actions_lora"]
        scale = float(np.max(np.abs(want)))
        result["actions"] = {
            "scale": scale,
            "merged_export_vs_jax_lora": _rel(outputs["lora"], want, scale),
            "base_export_vs_jax_base": _rel(outputs["base"], ref["actions_base"], scale),
            "jax_base_vs_jax_lora": _rel(ref["actions_base"], want, scale),
        }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "exports"}, indent=1))


if __name__ == "__main__":
    main(*(pathlib.Path(a) for a in sys.argv[1:5]))
