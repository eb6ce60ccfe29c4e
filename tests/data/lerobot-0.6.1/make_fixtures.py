"""Makes the LeRobot fixtures of issue 23 by running LeRobot 0.6.1's own code. See PROVENANCE.md.

    HF_HUB_OFFLINE=1 /work/lerobot-venv/bin/python tests/data/lerobot-0.6.1/make_fixtures.py SCRATCH_DIR [step ...]

Steps: listings, save, mapping (default: all). Needs `lerobot[pi]==0.6.1` (torch, transformers 5.4-5.5); never
touches the network: tokenizers are replaced by a local stand-in (see `_offline_tokenizers`), weights are random or
uninitialised. Writes into this folder; SCRATCH_DIR holds the multi-GB tiny-size model files (deleted per policy).
"""

import collections
import contextlib
import gzip
import io
import json
import pathlib
import shutil
import struct
import sys

HERE = pathlib.Path(__file__).resolve().parent
PYTORCH_FIXTURES = HERE.parent / "pytorch" / "state_dicts.json.gz"  # openpi PI0Pytorch listings (openpi@15a9616)

KINDS = ("pi0", "pi05", "pi0_fast")
# openpi's gemma.get_config("dummy") (tests/data/pytorch/jax_shapes.json.gz `dims`): the tiny test size.
DUMMY = {"width": 64, "depth": 4, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16}

# Known stats in openpi's norm_stats.json layout (state dim 8, action dim 7), written to norm_stats.json here.
STATE_DIM, ACTION_DIM = 8, 7


def _stats(n: int, off: float) -> dict:
    mean = [round(off + 0.25 * i, 4) for i in range(n)]
    std = [round(0.5 + 0.125 * i, 4) for i in range(n)]
    return {
        "mean": mean,
        "std": std,
        "q01": [round(m - 2.0 * s, 4) for m, s in zip(mean, std, strict=True)],
        "q99": [round(m + 2.5 * s, 4) for m, s in zip(mean, std, strict=True)],
    }


NORM_STATS = {"norm_stats": {"state": _stats(STATE_DIM, -1.0), "actions": _stats(ACTION_DIM, 0.5)}}
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's model image names
# Per policy: config overrides used for the `save` fixtures (openpi-like values, one dtype each).
SAVE_CONFIGS = {
    "pi0": {"dtype": "float32", "chunk_size": 50, "n_action_steps": 50, "normalization_mapping": "MEAN_STD"},
    "pi05": {"dtype": "bfloat16", "chunk_size": 10, "n_action_steps": 10, "normalization_mapping": "QUANTILES"},
    "pi0_fast": {"dtype": "float32", "chunk_size": 10, "n_action_steps": 10, "normalization_mapping": "QUANTILES"},
}


def _dump(name: str, obj) -> None:
    with gzip.GzipFile(HERE / name, "wb", mtime=0) as f:
        f.write(json.dumps(obj, separators=(",", ":")).encode())
    print("wrote", HERE / name, (HERE / name).stat().st_size)


def _modules():
    from lerobot.policies.pi0 import configuration_pi0
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi0_fast import configuration_pi0_fast
    from lerobot.policies.pi0_fast import modeling_pi0_fast
    from lerobot.policies.pi05 import configuration_pi05
    from lerobot.policies.pi05 import modeling_pi05

    return {
        "pi0": (configuration_pi0.PI0Config, modeling_pi0.PI0Policy, modeling_pi0),
        "pi05": (configuration_pi05.PI05Config, modeling_pi05.PI05Policy, modeling_pi05),
        "pi0_fast": (configuration_pi0_fast.PI0FastConfig, modeling_pi0_fast.PI0FastPolicy, modeling_pi0_fast),
    }


class _StandInTokenizer:
    """Local stand-in for google/paligemma-3b-pt-224 and lerobot/fast-action-tokenizer (the hub is unreachable).
    Only the attributes touched at construction time exist; nothing here reaches a saved file."""

    bos_token_id = 2
    eos_token_id = 1
    pad_token_id = 0
    vocab_size = 257152

    @classmethod
    def from_pretrained(cls, name, *args, **kwargs):
        print(f"  (stand-in tokenizer for {name!r})")
        return cls()


@contextlib.contextmanager
def _offline_tokenizers():
    """Replace AutoTokenizer/AutoProcessor where LeRobot 0.6.1 calls them at construction: PI0FastPolicy.__init__
    (modeling_pi0_fast) and TokenizerProcessorStep / ActionTokenizerProcessorStep.__post_init__ (tokenizer_processor).
    """
    from lerobot.policies.pi0_fast import modeling_pi0_fast
    from lerobot.processor import tokenizer_processor

    saved = []
    for mod in (modeling_pi0_fast, tokenizer_processor):
        for name in ("AutoTokenizer", "AutoProcessor"):
            saved.append((mod, name, getattr(mod, name)))
            setattr(mod, name, _StandInTokenizer)
    try:
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def _tiny(mod, *, projector_patch: bool):
    """The tiny-size patch: LeRobot's configs accept only gemma_2b/gemma_300m and take dims from the module-level
    `get_gemma_config` of each modeling file, so make it return openpi's "dummy" dims for any variant name.
    With `projector_patch`, also build PaliGemma with `vision_config.projection_dim = text hidden size` (LeRobot
    hard-codes 2048, as openpi's PyTorch port does). SigLIP (So400m/14) is not shrunk: LeRobot hard-codes it."""
    orig_cfg = mod.get_gemma_config
    orig_pg = mod.PaliGemmaForConditionalGenerationWithPiGemma

    def tiny_config(variant):
        orig_cfg(variant)  # still rejects unknown names
        return mod.GemmaConfig(**DUMMY)

    def patched_pg(config):
        config.vision_config.projection_dim = config.text_config.hidden_size
        return orig_pg(config=config)

    mod.get_gemma_config = tiny_config
    if projector_patch:
        mod.PaliGemmaForConditionalGenerationWithPiGemma = patched_pg
    try:
        yield
    finally:
        mod.get_gemma_config = orig_cfg
        mod.PaliGemmaForConditionalGenerationWithPiGemma = orig_pg


def _config(kind: str, dtype: str, **kw):
    cfg_cls = _modules()[kind][0]
    return cfg_cls(dtype=dtype, device="cpu", **kw)


def _build(kind: str, size: str, dtype: str, device: str):
    """PI0Policy / PI05Policy / PI0FastPolicy at `size` (full, dummy, dummy-projector-patch) on `device`."""
    import torch

    _, policy_cls, mod = _modules()[kind]
    cfg = _config(kind, dtype)
    cfg.device = device  # PreTrainedPolicy moves the model to config.device at the end of __init__
    tiny = _tiny(mod, size == "dummy-projector-patch") if size != "full" else contextlib.nullcontext()
    with tiny, _offline_tokenizers(), torch.device(device):
        return policy_cls(cfg)


def _listing(policy) -> dict:
    groups = collections.defaultdict(list)
    for n, p in policy.named_parameters(remove_duplicate=False):
        groups[id(p)].append(n)
    return {
        "state_dict": [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in policy.state_dict().items()],
        "tied": sorted(sorted(g) for g in groups.values() if len(g) > 1),
        "buffers": sorted(n for n, _ in policy.named_buffers()),
    }


def step_listings(scratch: pathlib.Path) -> None:
    """State-dict listings (meta device) of the three policies x size x dtype."""
    out = {}
    for kind in KINDS:
        for size in ("full", "dummy", "dummy-projector-patch"):
            for dtype in ("float32", "bfloat16"):
                policy = _build(kind, size, dtype, "meta")
                out[f"{kind}_{size}_{dtype}"] = _listing(policy)
                print(kind, size, dtype, len(out[f"{kind}_{size}_{dtype}"]["state_dict"]))
                del policy
    _dump("state_dicts.json.gz", out)


def _safetensors_header(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _features(kind: str):
    from lerobot.configs import FeatureType
    from lerobot.configs import PolicyFeature

    inputs = {f"observation.images.{c}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224)) for c in CAMERAS}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(STATE_DIM,))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,))}
    return inputs, outputs


def _dataset_stats():
    import numpy as np

    s = NORM_STATS["norm_stats"]
    # openpi key -> LeRobot feature key; all four openpi stats are passed through (float32, as LeRobot stores them)
    return {
        lr: {k: np.asarray(v, dtype=np.float32) for k, v in s[op].items()}
        for lr, op in (("observation.state", "state"), ("action", "actions"))
    }


def step_save(scratch: pathlib.Path) -> None:
    """What LeRobot's own save_pretrained writes: policy.save_pretrained (config.json, model.safetensors) at the
    tiny size (dummy-projector-patch; weights uninitialised) and the pre/post-processor pipelines'
    save_pretrained, for known stats. Keeps config.json and processor files verbatim, and the model.safetensors
    header (names, shapes, dtypes, order; no data) in saved_headers.json.gz. Then reloads the directory with
    LeRobot's from_pretrained / make_pre_post_processors and records what its loader printed."""
    from lerobot.configs import NormalizationMode
    from lerobot.policies.factory import make_pre_post_processors
    import torch

    (HERE / "norm_stats.json").write_text(json.dumps(NORM_STATS, indent=2) + "\n")
    headers, loads = {}, {}
    for kind in KINDS:
        cfg_cls, policy_cls, mod = _modules()[kind]
        kw = dict(SAVE_CONFIGS[kind])
        mode = NormalizationMode[kw.pop("normalization_mapping")]
        inputs, outputs = _features(kind)
        cfg = cfg_cls(device="cpu", input_features=inputs, output_features=outputs, **kw)
        cfg.normalization_mapping = {"VISUAL": NormalizationMode.IDENTITY, "STATE": mode, "ACTION": mode}
        out = scratch / kind
        shutil.rmtree(out, ignore_errors=True)
        with _tiny(mod, projector_patch=True), _offline_tokenizers():
            cfg.device = "meta"
            with torch.device("meta"):
                policy = policy_cls(cfg)
            cfg.device = "cpu"
            policy.to_empty(device="cpu")  # uninitialised weights: only the layout is kept
            policy.save_pretrained(out)
            del policy
            pre, post = make_pre_post_processors(cfg, dataset_stats=_dataset_stats())
            pre.save_pretrained(out)
            post.save_pretrained(out)
            headers[kind] = _safetensors_header(out / "model.safetensors")
            # reload, as a user would
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                loaded = policy_cls.from_pretrained(out)
            sd = loaded.state_dict()
            pre2, post2 = make_pre_post_processors(loaded.config, pretrained_path=str(out))
            loads[kind] = {
                "stdout": [line for line in buf.getvalue().splitlines() if line.strip()],
                "state_dict_keys_equal_file": sorted(sd) == sorted(k for k in headers[kind] if k != "__metadata__"),
                "preprocessor_steps": [type(s).__name__ for s in pre2.steps],
                "postprocessor_steps": [type(s).__name__ for s in post2.steps],
            }
            del loaded, sd
        dest = HERE / "saved" / kind
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for f in sorted(out.iterdir()):
            if f.name != "model.safetensors":
                shutil.copy(f, dest / f.name)
        shutil.rmtree(out)
        print(kind, sorted(p.name for p in dest.iterdir()))
    _dump("saved_headers.json.gz", {"headers": headers, "reload": loads})


def step_mapping(scratch: pathlib.Path) -> None:
    """openpi PI0Pytorch keys (tests/data/pytorch/state_dicts.json.gz) vs LeRobot's: (1) at full size, on the
    listings: names after prefixing "model.", shapes and dtypes; (2) at the tiny size on CPU: a model.safetensors
    laid out from openpi's names ("model." + name, openpi's shapes, random values, LeRobot's dtypes) next to a
    LeRobot config.json, loaded by LeRobot's from_pretrained (its output recorded) and, separately, by
    load_state_dict(strict=True) after LeRobot's own _fix_pytorch_state_dict_keys."""
    from safetensors.torch import save_file
    import torch

    with gzip.open(PYTORCH_FIXTURES) as f:
        openpi = json.load(f)
    with gzip.open(HERE / "state_dicts.json.gz") as f:
        lerobot = json.load(f)
    out = {"listings": {}, "load": {}}
    for kind, okind in (("pi0", "pi0"), ("pi05", "pi05")):
        for size in ("full", "dummy", "dummy-projector-patch"):
            for dtype in ("float32", "bfloat16"):
                o = {("model." + n): (s, d) for n, s, d in openpi[f"{okind}_{size}_{dtype}"]["state_dict"]}
                lr = {n: (s, d) for n, s, d in lerobot[f"{kind}_{size}_{dtype}"]["state_dict"]}
                out["listings"][f"{kind}_{size}_{dtype}"] = {
                    "only_openpi": sorted(set(o) - set(lr)),
                    "only_lerobot": sorted(set(lr) - set(o)),
                    "shape_differs": sorted(k for k in set(o) & set(lr) if o[k][0] != lr[k][0]),
                    "dtype_differs": sorted([k, o[k][1], lr[k][1]] for k in set(o) & set(lr) if o[k][1] != lr[k][1]),
                }
    for kind in ("pi0", "pi05"):
        cfg_cls, policy_cls, mod = _modules()[kind]
        dtype = "float32"
        names = openpi[f"{kind}_dummy-projector-patch_{dtype}"]["state_dict"]
        gen = torch.Generator().manual_seed(0)
        tensors = {"model." + n: torch.randn(s, generator=gen).to(getattr(torch, d)) for n, s, d in names}
        # tied in openpi (tests/data/pytorch `tied`): the export writes the embedding table under both names
        lm_head = "model.paligemma_with_expert.paligemma.lm_head.weight"
        tensors[lm_head.replace("lm_head", "model.language_model.embed_tokens")] = tensors[lm_head].clone()
        d = scratch / f"mapped_{kind}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        save_file(tensors, str(d / "model.safetensors"))
        inputs, outputs = _features(kind)
        cfg = cfg_cls(device="cpu", dtype=dtype, input_features=inputs, output_features=outputs)
        cfg._save_pretrained(d)  # noqa: SLF001  (what save_pretrained calls for the config)
        with _tiny(mod, projector_patch=True):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                policy = policy_cls.from_pretrained(d)
            sd = policy.state_dict()
            fixed = policy._fix_pytorch_state_dict_keys(dict(tensors), policy.config)  # noqa: SLF001  (LeRobot's key fixer)
            strict = policy.load_state_dict(fixed, strict=True)  # raises on any missing/unexpected key
            out["load"][kind] = {
                "from_pretrained_stdout": [line for line in buf.getvalue().splitlines() if line.strip()],
                "strict_missing": list(strict.missing_keys),
                "strict_unexpected": list(strict.unexpected_keys),
                "fixer_renamed_or_dropped": sorted(set(tensors) ^ set(fixed)),
                "not_bitwise_equal_after_from_pretrained": sorted(
                    k for k in tensors if not torch.equal(sd[k], tensors[k].to(sd[k].dtype))
                ),
            }
            del policy, sd, fixed
        shutil.rmtree(d)
        print(kind, out["load"][kind])
    _dump("mapping_check.json.gz", out)


STEPS = {"listings": step_listings, "save": step_save, "mapping": step_mapping}

if __name__ == "__main__":
    scratch = pathlib.Path(sys.argv[1])
    scratch.mkdir(parents=True, exist_ok=True)
    for step in sys.argv[2:] or list(STEPS):
        print("==", step)
        STEPS[step](scratch)
