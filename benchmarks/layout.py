"""The benchmark's model: pi0's experts, the LLM layers' params layout, random params and their LoRA config."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from benchmarks import full_size
from benchmarks.config import LAYERS
from benchmarks.config import TINY_EXPERTS
from benchmarks.config import TREE
from benchmarks.config import Args
from benchmarks.config import Expert


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"


def pi0_experts() -> tuple[tuple[Expert, ...], int]:
    """pi0's two experts (gemma_2b_lora, gemma_300m_lora) read off openpi's pi0_lora tree; and its depth."""
    from openpi_merge_plugin.lora import configs as lora_configs

    params = json.loads(TREE.read_text())["params"]
    experts = []
    for i, variant in enumerate(("gemma_2b_lora", "gemma_300m_lora")):
        s = _suffix(i)
        depth, heads, width, head_dim = params[f"{LAYERS}attn/q_einsum{s}/w"]["shape"]
        spec = lora_configs.SHIPPED_VARIANTS[variant][1].attn
        experts.append(
            Expert(
                variant=variant,
                width=width,
                mlp_dim=params[f"{LAYERS}mlp{s}/gating_einsum"]["shape"][-1],
                num_heads=heads,
                num_kv_heads=params[f"{LAYERS}attn/kv_einsum{s}/w"]["shape"][2],
                head_dim=head_dim,
                rank=params[f"{LAYERS}attn/q_einsum{s}/lora_a"]["shape"][-1],
                alpha=spec.alpha,
            )
        )
    return tuple(experts), depth


def experts_for(args: Args) -> tuple[Expert, ...]:
    return TINY_EXPERTS if args.tiny else pi0_experts()[0]


def layer_layout(experts: tuple[Expert, ...], depth: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Path -> (shape, dtype) of the LLM layers of a LoRA training checkpoint (frozen bases bf16, adapters fp32)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for i, e in enumerate(experts):
        s, r = _suffix(i), e.rank
        weights = {
            f"attn/q_einsum{s}/": (e.num_heads, e.width, e.head_dim),
            f"attn/kv_einsum{s}/": (2, e.num_kv_heads, e.width, e.head_dim),
            f"attn/attn_vec_einsum{s}/": (e.num_heads, e.head_dim, e.width),
            f"mlp{s}/gating_einsum": (2, e.width, e.mlp_dim),
            f"mlp{s}/linear": (e.mlp_dim, e.width),
        }
        for name, shape in weights.items():
            base, a, b = (
                f"{name}{x}" for x in (("w", "lora_a", "lora_b") if name.endswith("/") else ("", "_lora_a", "_lora_b"))
            )
            out[LAYERS + base] = ((depth, *shape), "bfloat16")
            out[LAYERS + a] = ((depth, *shape[:-1], r), "float32")
            out[LAYERS + b] = ((depth, *shape[:-2], r, shape[-1]), "float32")
        for norm in (f"pre_attention_norm{s}/scale", f"pre_ffw_norm{s}/scale"):
            out[LAYERS + norm] = ((depth, e.width), "bfloat16")
    return dict(sorted(out.items()))


def check_layout_against_openpi(depth: int) -> None:
    """The generated pi0 layout is exactly openpi's pi0_lora tree (LLM layers), shapes and training dtypes."""
    experts, _ = pi0_experts()
    want = {p.removesuffix("/value"): v for p, v in full_size.training_layout(depth).items() if p.startswith(LAYERS)}
    if layer_layout(experts, depth) != want:
        raise SystemExit("the benchmark's pi0 layer layout differs from openpi's pi0_lora tree")


def random_params(layout: dict[str, tuple[tuple[int, ...], str]], seed: int = 0) -> dict[str, np.ndarray]:
    """Flat random params: weights ~ U(-0.02, 0.02), adapters ~ U(-0.005, 0.005)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, (shape, dtype) in layout.items():
        x = rng.random(shape, dtype=np.float32)
        x -= 0.5
        x *= 0.01 if "lora" in path else 0.04
        out[path] = x.astype(dtype)
    return out


def resolved_lora(experts: tuple[Expert, ...]):
    from openpi_merge_plugin.lora.configs import ResolvedLoRA
    from openpi_merge_plugin.lora.spec import ExpertLoRA
    from openpi_merge_plugin.lora.spec import LoRASpec

    return ResolvedLoRA(
        experts={
            i: ExpertLoRA(
                e.variant, attn=LoRASpec(rank=e.rank, alpha=e.alpha), ffn=LoRASpec(rank=e.rank, alpha=e.alpha)
            )
            for i, e in enumerate(experts)
        },
        source="benchmark (openpi's shipped LoRA configs)",
    )


def nbytes(layout_or_arrays: dict[str, Any]) -> int:
    total = 0
    for v in layout_or_arrays.values():
        shape, dtype = v if isinstance(v, tuple) else (v.shape, v.dtype)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def pi0_params_bytes() -> int:
    """Bytes of the params of a pi0 LoRA training checkpoint (frozen weights bf16, the rest fp32)."""
    import ml_dtypes  # noqa: F401  (numpy learns the name 'bfloat16')

    return nbytes(full_size.training_layout(pi0_experts()[1]))
