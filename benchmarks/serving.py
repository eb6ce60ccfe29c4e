"""Section `serving` (needs openpi): LLM forward passes, LoRA config against the merged params."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from benchmarks.config import PI0_PREFIX_TOKENS
from benchmarks.config import PI0_SUFFIX_TOKENS
from benchmarks.config import Args
from benchmarks.config import Expert
from benchmarks.layout import _suffix
from benchmarks.layout import experts_for
from benchmarks.layout import pi0_experts
from benchmarks.layout import random_params
from benchmarks.layout import resolved_lora
from benchmarks.timing import measure_all


def section_serving(args: Args) -> dict[str, Any]:
    import jax.numpy as jnp

    experts = experts_for(args)
    full_depth = 2 if args.tiny else pi0_experts()[1]
    prefix_len, suffix_len = (16, 4) if args.tiny else (PI0_PREFIX_TOKENS, PI0_SUFFIX_TOKENS)
    rng = np.random.default_rng(0)

    def bf16(shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), jnp.bfloat16)

    e0, e1 = experts
    prefix_depth = min(args.prefix_depth, full_depth)
    prefix = {
        "x": [bf16((1, prefix_len, e0.width)), None],
        "positions": jnp.arange(prefix_len)[None],
        "mask": jnp.ones((1, prefix_len, prefix_len), bool),
    }
    cache_shape = (full_depth, 1, prefix_len, e1.num_kv_heads, e1.head_dim)
    suffix = {
        "x": [None, bf16((1, suffix_len, e1.width))],
        "positions": prefix_len + jnp.arange(suffix_len)[None],
        "mask": jnp.ones((1, suffix_len, prefix_len + suffix_len), bool),
        "kv_cache": (bf16(cache_shape), bf16(cache_shape)),
    }
    return {
        "prefix": _serve_pass(experts, prefix_depth, expert=0, inputs=prefix, repeats=args.serving_repeats),
        "suffix": _serve_pass(experts, full_depth, expert=1, inputs=suffix, repeats=args.serving_repeats),
        "prefix_depth": prefix_depth,
        "full_depth": full_depth,
        "prefix_len": prefix_len,
        "suffix_len": suffix_len,
    }


def _serve_pass(experts: tuple[Expert, ...], depth: int, *, expert: int, inputs: dict, repeats: int) -> dict:
    """One pass of openpi's gemma.Module on one expert's tokens: LoRA variants vs merged params (non-LoRA variants)."""
    from flax import traverse_util
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from openpi.models import gemma
    from openpi.models import lora

    from openpi_merge_plugin.checkpoint import sources
    from openpi_merge_plugin.merge import engine

    def module(*, with_lora: bool) -> gemma.Module:
        configs = [
            gemma.Config(
                width=e.width,
                depth=depth,
                mlp_dim=e.mlp_dim,
                num_heads=e.num_heads,
                num_kv_heads=e.num_kv_heads,
                head_dim=e.head_dim,
                lora_configs={k: lora.LoRAConfig(rank=e.rank, alpha=e.alpha) for k in ("attn", "ffn")}
                if with_lora
                else {},
            )
            for e in experts
        ]
        return gemma.Module(configs=configs, embed_dtype="bfloat16")

    lora_module, merged_module = module(with_lora=True), module(with_lora=False)
    shapes = jax.eval_shape(
        lambda: nn.Module.init(lora_module, jax.random.key(0), method="init", use_adarms=[False] * 2)
    )
    tag = _suffix(expert)
    layout = {
        "/".join(k): (tuple(v.shape), "float32" if "lora" in k[-1] else "bfloat16")
        for k, v in traverse_util.flatten_dict(shapes["params"]).items()
        if k[0] != "embedder"
        and (any(p.endswith(tag) for p in k) if tag else not any(re.search(r"_\d+$", p) for p in k))
    }
    flat = random_params(layout)
    merged = engine.merge_params(sources.unflatten(flat), resolved_lora(experts)).params

    def serving(tree):  # openpi's serving restores every param as bfloat16
        return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)

    lora_params, merged_params = serving(sources.unflatten(flat)), serving(merged)
    extra = {k: v for k, v in inputs.items() if k == "kv_cache"}

    def forward(m: gemma.Module):
        return jax.jit(lambda p: m.apply({"params": p}, inputs["x"], inputs["positions"], inputs["mask"], **extra)[0])

    f_lora, f_merged = forward(lora_module), forward(merged_module)
    runs = measure_all({"lora": lambda: f_lora(lora_params), "merged": lambda: f_merged(merged_params)}, repeats)
    got = np.asarray(f_merged(merged_params)[expert], np.float32)
    want = np.asarray(f_lora(lora_params)[expert], np.float32)
    return {
        "runs": runs,
        "depth": depth,
        "rel_diff": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
        "params": int(sum(np.prod(s) for s, _ in layout.values())),
    }
