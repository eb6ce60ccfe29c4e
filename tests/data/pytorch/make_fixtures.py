"""Makes the fixtures of tests/test_pytorch_layout.py by running upstream openpi (15a9616) code. See PROVENANCE.md.

    python tests/data/pytorch/make_fixtures.py UPSTREAM_ROOT SCRATCH_DIR [step ...]

Steps: shapes, listings, ckpt, convert, digests (default: all). Needs openpi, torch and transformers with
`transformers_replace` applied. `gen` (the checkpoint values) is also what the test regenerates; it is numpy only.
"""

import base64
import dataclasses
import gzip
import hashlib
import json
import pathlib
import subprocess
import sys
import zlib

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
KINDS = {"pi0": "debug", "pi05": "debug_pi05"}  # upstream train configs: dummy variants, action_dim 32
# (kind, precision, Pi0Config.dtype override or None)
RUNS = [
    ("pi0", "float32", None),
    ("pi0", "bfloat16", None),
    ("pi05", "float32", None),
    ("pi05", "bfloat16", None),
    ("pi0", "float32", "float32"),
]
BF16_SOURCES = "PaliGemma/llm/layers/mlp/"  # in the pi0.5 checkpoint these leaves are stored as bfloat16


def run_name(kind: str, precision: str, dtype: str | None) -> str:
    return f"{kind}_{precision}" + (f"_dtype-{dtype}" if dtype else "")


def gen(path: str, layer: int | None, shape) -> np.ndarray:
    """Deterministic float32 values for one leaf (or one layer of a stacked leaf): |x| in [2^-9, 2^-1), random
    mantissas, and an exact bf16 rounding tie every 4096 elements."""
    n = int(np.prod(shape, dtype=np.int64))
    i = np.arange(n, dtype=np.uint32)
    x = i * np.uint32(0x9E3779B1) + np.uint32(zlib.crc32(f"{path}#{layer}".encode()))
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> np.uint32(13)
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> np.uint32(16)
    mant = x & np.uint32(0x7FFFFF)
    tie = i % np.uint32(4096) == 0
    mant[tie] = (mant[tie] & np.uint32(0x7F0000)) | np.uint32(0x8000)
    bits = (x & np.uint32(0x80000000)) | ((np.uint32(118) + ((x >> np.uint32(28)) & np.uint32(7))) << 23) | mant
    return bits.view(np.float32).reshape(tuple(shape))


def is_stacked(path: str) -> bool:
    return "/encoderblock/" in path or "/llm/layers/" in path


def gen_leaf(path: str, shape, dtype: str) -> np.ndarray:
    stacked = is_stacked(path)
    a = np.stack([gen(path, i, shape[1:]) for i in range(shape[0])]) if stacked else gen(path, None, shape)
    if dtype == "bfloat16":
        import ml_dtypes

        a = a.astype(ml_dtypes.bfloat16)
    return a


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _dump(name: str, obj) -> None:
    with gzip.GzipFile(HERE / name, "wb", mtime=0) as f:
        f.write(json.dumps(obj, separators=(",", ":")).encode())
    print("wrote", HERE / name, (HERE / name).stat().st_size)


def _load(name: str):
    with gzip.open(HERE / name) as f:
        return json.load(f)


def _flat_shapes(cfg) -> dict:
    from flax import traverse_util
    import flax.nnx as nnx
    import jax

    state = nnx.state(nnx.eval_shape(cfg.create, jax.random.key(0)), nnx.Param).to_pure_dict()
    flat = traverse_util.flatten_dict(state, sep="/")
    return {k: [list(v.shape), str(v.dtype)] for k, v in sorted(flat.items())}


def step_shapes() -> None:
    """JAX param shapes (nnx.eval_shape of Pi0Config.create) and gemma.get_config dims."""
    from openpi.models import gemma
    from openpi.models import pi0_config

    dummy = {"paligemma_variant": "dummy", "action_expert_variant": "dummy"}
    cases = {"pi0_dummy": dummy, "pi05_dummy": {**dummy, "pi05": True}, "pi0_full": {}, "pi05_full": {"pi05": True}}
    out = {"trees": {}, "configs": {}, "dims": {}}
    for name, kw in cases.items():
        cfg = pi0_config.Pi0Config(**kw)
        out["trees"][name] = _flat_shapes(cfg)
        out["configs"][name] = {
            "pi05": cfg.pi05,
            "paligemma_variant": cfg.paligemma_variant,
            "action_expert_variant": cfg.action_expert_variant,
            "action_dim": cfg.action_dim,
            "action_horizon": cfg.action_horizon,
            "dtype": cfg.dtype,
        }
    for v in ("dummy", "gemma_300m", "gemma_2b", "gemma_300m_lora", "gemma_2b_lora"):
        c = gemma.get_config(v)
        out["dims"][v] = {
            f: getattr(c, f) for f in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")
        }
    _dump("jax_shapes.json.gz", out)


def step_listings() -> None:
    """PI0Pytorch state dicts (meta device): name, shape, dtype in order, and tied parameters."""
    import collections

    from openpi.models import pi0_config
    from openpi.models_pytorch import pi0_pytorch
    import openpi.models_pytorch.gemma_pytorch as gp
    import torch

    orig = gp.PaliGemmaForConditionalGeneration

    def patched(config):
        config.vision_config.projection_dim = config.text_config.hidden_size
        return orig(config=config)

    dummy = {"paligemma_variant": "dummy", "action_expert_variant": "dummy"}
    out = {}
    for kind in KINDS:
        for size, kw, patch in (("dummy", dummy, False), ("dummy-projector-patch", dummy, True), ("full", {}, False)):
            for dtype in ("float32", "bfloat16"):
                cfg = pi0_config.Pi0Config(pi05=kind == "pi05", dtype=dtype, pytorch_compile_mode=None, **kw)
                gp.PaliGemmaForConditionalGeneration = patched if patch else orig
                with torch.device("meta"):
                    m = pi0_pytorch.PI0Pytorch(cfg)
                gp.PaliGemmaForConditionalGeneration = orig
                groups = collections.defaultdict(list)
                for n, p in m.named_parameters(remove_duplicate=False):
                    groups[id(p)].append(n)
                out[f"{kind}_{size}_{dtype}"] = {
                    "state_dict": [
                        [k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in m.state_dict().items()
                    ],
                    "tied": sorted(sorted(g) for g in groups.values() if len(g) > 1),
                }
                print(kind, size, dtype, len(out[f"{kind}_{size}_{dtype}"]["state_dict"]))
                del m
    _dump("state_dicts.json.gz", out)


def step_ckpt(scratch: pathlib.Path) -> None:
    """Checkpoints of `gen` values in the plugin's layout (<step>/merged/params, {"params": tree})."""
    from flax import traverse_util
    import orbax.checkpoint as ocp

    trees = {}
    for kind in KINDS:
        shapes = _load("jax_shapes.json.gz")["trees"][f"{kind}_dummy"]
        dtypes = {
            p: ("bfloat16" if kind == "pi05" and p.startswith(BF16_SOURCES) else d) for p, (_, d) in shapes.items()
        }
        flat = {tuple(p.split("/")): gen_leaf(p, s, dtypes[p]) for p, (s, _) in shapes.items()}
        params = scratch / f"{kind}_gen" / "10" / "merged" / "params"
        params.parent.mkdir(parents=True, exist_ok=True)
        with ocp.PyTreeCheckpointer() as ck:
            ck.save(params, {"params": traverse_util.unflatten_dict(flat)})
        trees[kind] = {p: [s, dtypes[p]] for p, (s, _) in shapes.items()}
        del flat
    (scratch / "gen_trees.json").write_text(json.dumps(trees))


# The minimal in-memory patches that let upstream's converter handle the "dummy" variants (no-ops for
# gemma_2b/gemma_300m): text dims and expert variant from the config, PaliGemma o_proj reshape (only right when
# N*H == W upstream), and the PyTorch projector width (hard-coded 2048 upstream).
PATCHES = [
    (
        """                    "hidden_size": 2048,
                    "num_hidden_layers": 18,
                    "num_attention_heads": 8,
                    "head_dim": 256,
                    "intermediate_size": 16384,""",
        """                    "hidden_size": openpi.models.gemma.get_config(model_config.paligemma_variant).width,
                    "num_hidden_layers": openpi.models.gemma.get_config(model_config.paligemma_variant).depth,
                    "num_attention_heads": openpi.models.gemma.get_config(model_config.paligemma_variant).num_heads,
                    "head_dim": openpi.models.gemma.get_config(model_config.paligemma_variant).head_dim,
                    "intermediate_size": openpi.models.gemma.get_config(model_config.paligemma_variant).mlp_dim,""",
    ),
    (
        """            .transpose(2, 0, 1)
            .reshape(
                config.text_config.num_attention_heads * config.text_config.head_dim, config.text_config.hidden_size
            )""",
        """            .transpose(2, 0, 1)
            .reshape(
                config.text_config.hidden_size, config.text_config.num_attention_heads * config.text_config.head_dim
            )""",
    ),
    (
        'openpi.models.gemma.get_config("gemma_300m")',
        "openpi.models.gemma.get_config(model_config.action_expert_variant)",
    ),
]


def step_convert_one(upstream: str, ckpt: str, config_name: str, out: str, precision: str, dtype: str) -> None:
    """One run of upstream's examples/convert_jax_model_to_pytorch.py, patched in memory (file untouched)."""
    import types

    import openpi.models_pytorch.gemma_pytorch as gp
    import openpi.training.config as _config

    src = pathlib.Path(upstream, "examples/convert_jax_model_to_pytorch.py").read_text()
    for old, new in PATCHES:
        assert src.count(old) == 1, old[:80]
        src = src.replace(old, new)
    orig = gp.PaliGemmaForConditionalGeneration

    def patched(config):
        config.vision_config.projection_dim = config.text_config.hidden_size
        return orig(config=config)

    gp.PaliGemmaForConditionalGeneration = patched
    if dtype != "default":
        get = _config.get_config

        def get_config(name):
            c = get(name)
            return dataclasses.replace(c, model=dataclasses.replace(c.model, dtype=dtype))

        _config.get_config = get_config
    mod = types.ModuleType("convert_patched")
    exec(compile(src, "convert_jax_model_to_pytorch.py", "exec"), mod.__dict__)
    mod.main(checkpoint_dir=ckpt, config_name=config_name, output_path=out, precision=precision)


def step_convert(upstream: str, scratch: pathlib.Path) -> None:
    for kind, precision, dtype in RUNS:
        ckpt = str(scratch / f"{kind}_gen" / "10" / "merged")
        assert ("pi05" in ckpt) == (kind == "pi05"), "upstream picks the pi0.5 norms by 'pi05' in the path"
        out = str(scratch / "out" / run_name(kind, precision, dtype))
        args = [upstream, ckpt, KINDS[kind], out, precision, dtype or "default"]
        subprocess.run([sys.executable, __file__, "convert-one", *args], check=True, cwd=upstream)


def step_digests(scratch: pathlib.Path) -> None:
    """sha256 of every converted tensor (but the random expert lm_head) and of every restored source slice."""
    import struct

    from flax import traverse_util
    from openpi.models import model as _model
    from safetensors import safe_open

    trees = json.loads((scratch / "gen_trees.json").read_text())
    out = {"trees": trees, "sources": {}, "runs": {}}
    for kind in KINDS:
        params_dir = scratch / f"{kind}_gen" / "10" / "merged" / "params"
        restored = _model.restore_params(params_dir, restore_type=np.ndarray, dtype="float32")  # as the converter
        digests = {}
        for k, v in traverse_util.flatten_dict(restored, sep="/").items():
            if is_stacked(k):
                digests.update({f"{k}#{i}": sha(v[i]) for i in range(v.shape[0])})
            else:
                digests[f"{k}#None"] = sha(v)
        out["sources"][kind] = digests
        del restored
    for kind, precision, dtype in RUNS:
        d = scratch / "out" / run_name(kind, precision, dtype)
        raw = (d / "model.safetensors").open("rb").read(1 << 20)
        n = struct.unpack("<Q", raw[:8])[0]
        tensors = {}
        with safe_open(d / "model.safetensors", framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118
                if name != "paligemma_with_expert.gemma_expert.lm_head.weight":
                    tensors[name] = sha(f.get_tensor(name))
        out["runs"][run_name(kind, precision, dtype)] = {
            "kind": kind,
            "precision": precision,
            "model_dtype": dtype or "bfloat16",
            "config_json": (d / "config.json").read_text(),
            "header": base64.b64encode(raw[: 8 + n]).decode(),
            "file_size": (d / "model.safetensors").stat().st_size,
            "tensors": tensors,
        }
    _dump("converted.json.gz", out)


def main(argv: list[str]) -> None:
    if argv[0] == "convert-one":
        step_convert_one(*argv[1:])
        return
    upstream, scratch = argv[0], pathlib.Path(argv[1]).resolve()
    steps = argv[2:] or ["shapes", "listings", "ckpt", "convert", "digests"]
    for s in steps:
        {
            "shapes": step_shapes,
            "listings": step_listings,
            "ckpt": lambda: step_ckpt(scratch),
            "convert": lambda: step_convert(upstream, scratch),
            "digests": lambda: step_digests(scratch),
        }[s]()


if __name__ == "__main__":
    main(sys.argv[1:])
