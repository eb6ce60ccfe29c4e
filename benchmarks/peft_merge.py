"""Section `peft`: PEFT's `merge_and_unload` on a PyTorch model with the same weight shapes (`bench` extra)."""

from __future__ import annotations

import time
from typing import Any

from benchmarks.config import Args
from benchmarks.config import Expert
from benchmarks.layout import experts_for
from benchmarks.timing import HostPeak


def peft_model(expert: Expert, depth: int, dtype: Any, device: str):
    """Linear layers with the weight shapes of one expert's adapted einsums (q, k, v, out, gate, up, down)."""
    import torch

    def lin(n_in: int, n_out: int):
        return torch.nn.Linear(n_in, n_out, bias=False, dtype=dtype, device=device)

    def layer() -> torch.nn.Module:
        e, heads = expert, expert.num_heads * expert.head_dim
        kv = expert.num_kv_heads * expert.head_dim
        return torch.nn.ModuleDict(
            {
                "q": lin(e.width, heads),  # q_einsum [N, D, H]
                "k": lin(e.width, kv),  # kv_einsum [2, K, D, H], first half
                "v": lin(e.width, kv),  # second half
                "o": lin(heads, e.width),  # attn_vec_einsum [N, H, D]
                "gate": lin(e.width, e.mlp_dim),  # gating_einsum [2, D, F], first half
                "up": lin(e.width, e.mlp_dim),  # second half
                "down": lin(e.mlp_dim, e.width),  # linear [F, D]
            }
        )

    with torch.no_grad():
        return torch.nn.ModuleList([layer() for _ in range(depth)])


def section_peft(args: Args, *, accelerator: bool) -> dict[str, Any]:
    import peft
    import torch

    device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
    if accelerator and device == "cpu":
        return {"skipped": "this torch build has no CUDA"}
    experts = experts_for(args)
    models = [peft_model(e, args.depth, torch.bfloat16, device) for e in experts]
    params = sum(p.numel() for m in models for p in m.parameters())
    dtypes = {"weight_dtype": str(next(models[0].parameters()).dtype)}

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def merge_all(*, safe: bool) -> float:
        """Wraps each expert's model with fresh random adapters (untimed), then times merge_and_unload."""
        seconds = 0.0
        for i, e in enumerate(experts):
            config = peft.LoraConfig(r=e.rank, lora_alpha=e.alpha, target_modules=list(models[i][0].keys()))
            wrapped = peft.get_peft_model(models[i], config)
            with torch.no_grad():
                for name, p in wrapped.named_parameters():
                    if "lora_" in name:
                        p.uniform_(-0.005, 0.005)
                        dtypes["adapter_dtype"] = str(p.dtype)
            sync()
            start = time.perf_counter()
            models[i] = wrapped.merge_and_unload(progressbar=False, safe_merge=safe)
            sync()
            seconds += time.perf_counter() - start
        return seconds

    def timed(*, safe: bool) -> dict[str, Any]:
        merge_all(safe=safe)
        times, host = [], []
        for _ in range(args.repeats):
            with HostPeak() as peak:
                times.append(merge_all(safe=safe))
            host.append(peak.extra)
        return {"times": times, "host_extra": None if None in host else max(host), "device_extra": None}

    runs = {"peft": timed(safe=False), "peft_safe": timed(safe=True)}
    return {
        "torch_device": device,
        "torch": torch.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "params": params,
        **dtypes,
        "runs": runs,
    }
