"""Benchmark of the merge engine at pi0's real layer sizes: one run, this machine's CPU and (if any) the accelerator.

    python scripts/benchmark.py                                  # writes docs/benchmark.md and prints it
    python scripts/benchmark.py --openpi-python /path/to/openpi/venv/bin/python   # + serving and training saves
    python scripts/benchmark.py --tiny                           # tiny sizes, seconds (tests/test_benchmark_smoke.py)

What it measures, on a tree of pi0's LLM layers (gemma_2b + gemma_300m dims read from openpi's `pi0_lora` tree,
bf16 base weights, fp32 adapters with openpi's shipped ranks and alphas) at `--depth` of the 18 layers:

1. merge time against a plain dtype-converting copy of the same weights (the floor), in memory and on disk;
2. PEFT's `merge_and_unload` on a PyTorch model with the same weight shapes, ranks and dtypes (`bench` extra);
3. the naive merge (every full delta materialised at once): time and peak memory;
4. the engine's peak extra memory, host and device (streamed from live params at `--memory-depth` layers and
   twice that, with the default write buffer and with none);
5. a save with merge-on-save against one without (and, with openpi, a real tiny training run's saves);
6. serving: openpi's LLM forward passes with the LoRA config against the merged one (needs openpi).

Each section runs in a fresh child process per JAX platform (`JAX_PLATFORMS=cpu`, then the default accelerator),
so peak memory belongs to that section; times are the median [min-max] of `--repeats` runs after a warm-up run
that compiles. `--sections cli` reproduces the older whole-process table (the CLI under `/usr/bin/time -v`).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import ctypes
import dataclasses
import datetime as dt
import gc
import json
import logging
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Literal

import numpy as np
import tyro

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import benchmark_full_size  # noqa: E402
import benchmark_report  # noqa: E402

TREE = benchmark_full_size.TREE  # openpi 15a9616's pi0_lora params tree (shapes only)
LAYERS = benchmark_full_size.LLM_LAYERS
FIXTURE_STEP = REPO / "tests" / "data" / "openpi-15a9616" / "lora-tiny" / "checkpoint" / "2"
RUNNER = REPO / "tests" / "openpi_support" / "run_openpi_script.py"
PI0_PREFIX_TOKENS = 3 * 256 + 48  # three 224px images (16x16 patches each) + max_token_len, pi0's inference prefix
PI0_SUFFIX_TOKENS = 1 + 50  # state token + action_horizon
Section = Literal["merge", "peft", "save", "serving", "train", "cli"]
ALL_SECTIONS: tuple[Section, ...] = ("merge", "peft", "save", "serving", "train")
OPENPI_SECTIONS = ("serving", "train")
# Write buffers (`host_buffer_mib`) measured in section 4 besides none and the default.
BUFFER_SWEEP_MIB = (128, 512)

logger = logging.getLogger("benchmark")


@dataclasses.dataclass
class Args:
    # Tiny widths and depth (a few seconds; the smoke test) instead of pi0's.
    tiny: bool = False
    # LLM layers (of 18) in the merge measurements. The engine works one layer slice at a time, so its time per
    # layer and its memory do not depend on depth; depth only scales the run time.
    depth: int = 2
    # LLM layers for the streamed merge's memory (section 4), measured there and at twice that: enough fp32 slices of
    # the largest weight (256 MiB each) to fill the largest write buffer measured (512 MiB) and reach the steady
    # state (from 4 to 8 layers the peak still rises by ~0.1 GiB as the buffer fills; from 8 to 16 it stays flat).
    memory_depth: int = 8
    # Layers in the serving prefix pass (gemma_2b over 816 tokens: seconds per layer on a CPU). The suffix pass
    # (action expert, 51 tokens, attending to an 816-token KV cache) runs all 18.
    prefix_depth: int = 1
    # Timed runs per figure (after one untimed warm-up run).
    repeats: int = 3
    # Timed runs per serving pass (seconds each, and the LoRA overhead is small against the run-to-run spread).
    serving_repeats: int = 5
    # Which parts to run (`cli`: the older whole-process table, not run by default).
    sections: tuple[Section, ...] = ALL_SECTIONS
    # Where to write the markdown results.
    output: pathlib.Path = REPO / "docs" / "benchmark.md"
    # A Python with upstream openpi importable, for `serving` and `train` (default: this one, if it has openpi).
    openpi_python: pathlib.Path | None = None
    # Also run on the JAX accelerator, when there is one.
    accelerator: bool = True
    # Where checkpoints are written (default: a temporary directory).
    workdir: pathlib.Path | None = None
    # Only render the markdown again from the raw results of an earlier run (the .json next to its markdown).
    from_json: pathlib.Path | None = None
    # Internal: run one section in this process (`platform:section`) and write its JSON here.
    child: str | None = None
    child_out: pathlib.Path | None = None


@dataclasses.dataclass(frozen=True)
class Expert:
    """One gemma expert's layer dims and LoRA config (openpi's `gemma.Config`)."""

    variant: str
    width: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int
    alpha: float


# Both experts alike, so that the engine compiles one kernel per weight for both (compiling dominates at tiny sizes).
TINY_EXPERTS = (Expert("tiny", 32, 64, 2, 1, 16, 4, 4.0),) * 2


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"


def pi0_experts() -> tuple[tuple[Expert, ...], int]:
    """pi0's two experts (gemma_2b_lora, gemma_300m_lora) read off openpi's pi0_lora tree; and its depth."""
    from openpi_merge_plugin import lora_configs

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
    want = {
        p.removesuffix("/value"): v
        for p, v in benchmark_full_size.training_layout(depth).items()
        if p.startswith(LAYERS)
    }
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
    from openpi_merge_plugin.lora_configs import ResolvedLoRA
    from openpi_merge_plugin.lora_spec import ExpertLoRA
    from openpi_merge_plugin.lora_spec import LoRASpec

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


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class HostPeak:
    """Peak resident memory above the level at entry (Linux: resets VmHWM through /proc/self/clear_refs).

    Free heap memory is handed back first (glibc `malloc_trim`), so that what the measured call reuses of it counts.
    """

    extra: int | None = None

    def __enter__(self) -> HostPeak:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _status_kib("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            self.extra = max(0, _status_kib("VmHWM") - self._before) * 1024


def _device_stat(key: str) -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get(key)


def measure(fn: Callable[[], Any], repeats: int, *, label: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """`measure_all` of one function."""
    out = measure_all({"fn": fn}, repeats, **kwargs)["fn"]
    return out if label is None else {**out, "label": label}


def measure_all(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: bool = True,
    setup: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times each function (result blocked on), the functions taking turns run by run, so that a change in the
    machine's load hits them alike. Per function: times, peak host memory above the level at the start of a run
    (max over runs), and peak device memory above the level before its first run.

    Devices only keep a lifetime peak, so where the backend reports one, each function first runs once alone, in
    the given order: callers list them in increasing order of device use.
    """
    import jax

    def run(fn: Callable[[], Any]) -> tuple[float, int | None]:
        if setup is not None:
            setup()
        with HostPeak() as peak:
            start = time.perf_counter()
            result = fn()
            jax.block_until_ready(result)
            elapsed = time.perf_counter() - start
            del result
        return elapsed, peak.extra

    device: dict[str, int] = {}
    if _device_stat("peak_bytes_in_use") is not None:
        for name, fn in fns.items():
            before = _device_stat("bytes_in_use")
            run(fn)
            device[name] = _device_stat("peak_bytes_in_use") - before
    elif warmup:
        for fn in fns.values():
            run(fn)
    out = {name: {"times": [], "host": [], "device_extra": device.get(name)} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            elapsed, host = run(fn)
            out[name]["times"].append(elapsed)
            out[name]["host"].append(host)
    for res in out.values():
        host = res.pop("host")
        res["host_extra"] = None if None in host else max(host)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section `merge`: floor, engine in memory and on disk, naive, kernel profile


@dataclasses.dataclass
class MergeInputs:
    experts: tuple[Expert, ...]
    depth: int
    flat: dict[str, np.ndarray]
    adapters: list
    resolved: Any

    @property
    def params(self) -> dict[str, Any]:
        from openpi_merge_plugin import sources

        return sources.unflatten(self.flat)

    @property
    def adapted_params(self) -> int:
        return sum(int(np.prod(self.flat[a.base_path].shape)) for a in self.adapters)


def largest_slice_f32_bytes(inputs: MergeInputs) -> int:
    return max(int(np.prod(inputs.flat[a.base_path].shape[len(a.lead_shape) :])) * 4 for a in inputs.adapters)


def merge_inputs(experts: tuple[Expert, ...], depth: int, seed: int = 0) -> MergeInputs:
    from openpi_merge_plugin import engine
    from openpi_merge_plugin import sources

    flat = random_params(layer_layout(experts, depth), seed)
    resolved = resolved_lora(experts)
    adapters = engine.plan(sources.InMemorySource(sources.unflatten(flat)).tree, resolved)
    return MergeInputs(experts, depth, flat, adapters, resolved)


def floor_numpy(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """The plain copy: every adapted base weight (host, bf16) converted to the output dtype."""
    return {a.base_path: inputs.flat[a.base_path].astype(out_dtype) for a in inputs.adapters}


def floor_device(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """What the engine moves, without its math: per layer slice, host -> device, astype, device -> host."""
    convert = _convert(out_dtype)
    out = {}
    for a in inputs.adapters:
        w = inputs.flat[a.base_path]
        merged = np.empty(w.shape, out_dtype)
        for index in np.ndindex(*a.lead_shape):
            merged[index] = np.asarray(convert(w[index]))
        out[a.base_path] = merged
    return out


def engine_in_memory(inputs: MergeInputs, out_dtype: str, *, verify: bool = True):
    from openpi_merge_plugin import engine

    return engine.merge_params(
        inputs.params, inputs.resolved, engine.MergeOptions(output_dtype=out_dtype, verify=verify)
    )


def naive_merge(inputs: MergeInputs, out_dtype: str) -> dict[str, np.ndarray]:
    """The naive merge: the whole tree on the device, every full delta materialised at once, then added (no checks)."""
    import jax

    device = {p: jax.device_put(x) for p, x in inputs.flat.items()}
    deltas = {
        a.base_path: _full_delta(device[a.a_path], device[a.b_path], a.delta.equation, len(a.lead_shape), a.scale)
        for a in inputs.adapters
    }
    jax.block_until_ready(deltas)
    return {p: np.asarray(_add(device[p], d, out_dtype)) for p, d in deltas.items()}


_JITS: dict[Any, Any] = {}


def _full_delta(a, b, eqn: str, n_lead: int, scale: float):
    import jax
    import jax.numpy as jnp

    key = ("delta", eqn, n_lead)
    if key not in _JITS:
        lead = "".join(c for c in "zyxwvu" if c not in eqn)[:n_lead]
        lhs, out = eqn.split("->")
        x, y = lhs.split(",")
        full = f"{lead}{x},{lead}{y}->{lead}{out}"
        _JITS[key] = jax.jit(
            lambda a, b, s: jnp.einsum(full, a.astype(jnp.float32), b, precision=jax.lax.Precision.HIGHEST) * s
        )
    return _JITS[key](a, b, np.float32(scale))


def _convert(out_dtype: str):
    import jax

    key = ("convert", out_dtype)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda x: x.astype(out_dtype))
    return _JITS[key]


def _add(w, delta, out_dtype: str):
    import jax
    import jax.numpy as jnp

    key = ("add", out_dtype)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda w, d: (w.astype(jnp.float32) + d).astype(out_dtype))
    return _JITS[key](w, delta)


def write_step(step: pathlib.Path, flat: dict[str, np.ndarray]) -> None:
    """An openpi-style step directory (`params/` with leaves ending in `value`, `assets/`) holding `flat`."""
    from openpi_merge_plugin import orbax_stream
    from openpi_merge_plugin.adapters import ShapeDtype

    def stream():
        for path, x in flat.items():
            lead = 1 if x.ndim >= 3 else 0
            slices = ((index, x[index]) for index in np.ndindex(*x.shape[:lead]))
            yield orbax_stream.LeafWrite(f"{path}/value", slices, lead)

    step.mkdir(parents=True)
    structure = {f"{p}/value": ShapeDtype(tuple(x.shape), x.dtype.name) for p, x in flat.items()}
    orbax_stream.save(step / "params", structure, stream)
    (step / "assets").mkdir()


def floor_disk(step: pathlib.Path, out: pathlib.Path, inputs: MergeInputs, out_dtype: str) -> None:
    """The same I/O as `merge_checkpoint` without the math: read each weight and its adapters with Orbax, convert,
    stream to Orbax in the engine's column pieces, checksum the files (manifest), fsync and commit; other leaves
    passed through.
    """
    from openpi_merge_plugin import adapters as _adapters
    from openpi_merge_plugin import orbax_stream
    from openpi_merge_plugin import output
    from openpi_merge_plugin import slice_chunks
    from openpi_merge_plugin import sources

    source = sources.OrbaxSource(step / "params")
    by_base = {a.base_path: a for a in inputs.adapters}
    drop = {p for a in inputs.adapters for p in (a.a_path, a.b_path)}
    structure = _adapters.merged_structure(source.tree, inputs.adapters, lambda _: out_dtype)

    def stream():
        pending = []
        for path in [*source.tree, None]:
            if path is not None and path not in drop and path not in by_base:
                pending.append(path)
                continue
            if pending:
                yield from (orbax_stream.whole(p, v) for p, v in source.read(pending).items())
                pending = []
            if path in by_base:
                a = by_base[path]
                w = source.read([a.base_path, a.a_path, a.b_path])[a.base_path]
                lead = len(a.lead_shape)
                bounds = slice_chunks.column_bounds(a.delta.layer_equation, w.shape[lead:])
                if bounds is None:  # written in the same pieces as the engine writes
                    pieces = ((index, w[index].astype(out_dtype)) for index in np.ndindex(*a.lead_shape))
                else:
                    pieces = (
                        ((*index, cols), w[index][..., cols].astype(out_dtype))
                        for index in np.ndindex(*a.lead_shape)
                        for cols in (slice(*b) for b in bounds)
                    )
                yield orbax_stream.LeafWrite(path, pieces, lead, None if bounds is None else bounds[0][1])

    with output.staged_directory(out, overwrite=True) as tmp:
        orbax_stream.save(tmp / "params", structure, stream)
        output.write_manifest(tmp, {})


def kernel_profile(inputs: MergeInputs, repeats: int) -> list[dict[str, Any]]:
    """Where the kernel's time goes on the largest layer slice: the whole kernel, then each part timed on its own."""
    import functools

    import jax
    import jax.numpy as jnp

    from openpi_merge_plugin import equations as eq
    from openpi_merge_plugin import slice_chunks
    from openpi_merge_plugin import slice_ops as so

    a = max(inputs.adapters, key=lambda a: int(np.prod(inputs.flat[a.base_path].shape[len(a.lead_shape) :])))
    index = (0,) * len(a.lead_shape)
    host_w = inputs.flat[a.base_path][index]
    w, la, lb = (jax.device_put(inputs.flat[p][index]) for p in (a.base_path, a.a_path, a.b_path))
    eqns = eq.to_letters(a.delta.layer_equation, *a.delta.lora_equations)
    factor, key, f32 = jnp.float32(a.scale), jax.random.key(0), jnp.float32
    x = jax.random.normal(key, so._probe_shape(eqns[0], w.shape), f32)  # noqa: SLF001
    kernel = functools.partial(so.merge_slice, delta_eqn=a.delta.equation, layer_eqns=eqns)

    def merged(w, la, lb):
        return so._merge32(w.astype(f32), la, lb, factor, a.delta.equation)  # noqa: SLF001

    def statistics(w, la, lb):  # the kernel's one pass for ||W||, the bf16 loss and finiteness
        m, d = merged(w, la, lb)
        w32 = w.astype(f32)
        lost = m.astype(jnp.bfloat16).astype(f32) - w32 - d
        return so._row_sums(jnp.square(w32), jnp.square(lost), jnp.isfinite(m))  # noqa: SLF001

    def verification(w, la, lb, x):
        m = merged(w, la, lb)[0]
        want = so._lora_forward(x, w.astype(f32), la, lb, factor, eqns)  # noqa: SLF001
        return jnp.max(jnp.abs(so._layer_einsum(eqns[0], x, m) - want)), jnp.max(jnp.abs(want))  # noqa: SLF001

    bounds = slice_chunks.column_bounds(a.delta.layer_equation, tuple(w.shape))
    pieces = "whole" if bounds is None else f"{len(bounds)} column pieces of {bounds[0][1]} columns"

    def engine_slice(w, la, lb, x):
        run = slice_chunks.SliceMerge(
            w, la, lb, factor, key, delta_eqn=a.delta.equation, layer_eqns=eqns, out_dtype=np.dtype("float32"),
            verify=True, bounds=bounds,
        )  # fmt: skip
        return [piece for _, piece in run], run.stats

    out = [
        measure(
            lambda: engine_slice(w, la, lb, x),
            repeats,
            label=f"the engine's slice merge ({pieces}, `slice_chunks.SliceMerge`), fp32 out, verify, pieces on host",
        )
    ]
    parts: list[tuple[str, Callable[..., Any]]] = [
        (
            "whole kernel, fp32 out, verify: one `merge_slice` call on the whole slice",
            lambda w, la, lb, x: kernel(w, la, lb, factor, key, out_dtype=f32, verify=True),
        ),
        (
            "whole kernel, fp32 out, no verify",
            lambda w, la, lb, x: kernel(w, la, lb, factor, key, out_dtype=f32, verify=False),
        ),
        ("bf16 -> fp32 convert only (the floor's math)", lambda w, la, lb, x: w.astype(f32)),
        ("merge only: w + factor * einsum(a, b)", lambda w, la, lb, x: merged(w, la, lb)[0]),
        (
            "merge + statistics: ||W||, bf16 loss and finiteness in one row-wise variadic reduction",
            lambda w, la, lb, x: statistics(w, la, lb),
        ),
        (
            "stat delta_norm (Gram form, factors only)",
            lambda w, la, lb, x: so._delta_norm(  # noqa: SLF001
                a.delta.equation, la, lb, factor
            ),
        ),
        (
            "merge + verification: LoRA forward and merged probe matmuls (batched over the weight's leading axes)",
            verification,
        ),
    ]
    for label, fn in parts:
        jitted = jax.jit(fn)
        out.append(measure(lambda jitted=jitted: jitted(w, la, lb, x), repeats, label=label))
    out.append(
        measure(
            lambda: np.asarray(_convert("float32")(jax.device_put(host_w))),
            repeats,
            label="host -> device slice, astype, device -> host (the data path)",
        )
    )
    out.append({"label": "largest slice", "path": a.base_path, "shape": list(w.shape)})
    return out


def section_merge(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    """Floors, engine in memory and on disk, kernel profile, naive; in increasing order of device memory use."""
    from openpi_merge_plugin import api

    experts = experts_for(args)
    if not args.tiny:
        check_layout_against_openpi(args.depth)
    one = merge_inputs(experts, 1, seed=1)
    for out_dtype in ("float32", "bfloat16"):  # compiles every kernel (layer slices do not depend on depth)
        engine_in_memory(one, out_dtype)
    engine_in_memory(one, "float32", verify=False)
    floor_device(one, "float32")
    runs = {"engine_mem_f32_depth1": measure(lambda: engine_in_memory(one, "float32"), 1, warmup=False)}
    inputs = merge_inputs(experts, args.depth)
    r = args.repeats
    in_memory = {
        "floor_numpy": lambda: floor_numpy(inputs, "float32"),
        "floor_device": lambda: floor_device(inputs, "float32"),
        "engine_mem_f32": lambda: engine_in_memory(inputs, "float32"),
        "engine_mem_bf16": lambda: engine_in_memory(inputs, "bfloat16"),
        "engine_mem_f32_noverify": lambda: engine_in_memory(inputs, "float32", verify=False),
    }
    runs.update(measure_all(in_memory, r, warmup=False))  # compiled above
    report = engine_in_memory(inputs, "float32").report

    step, out = workdir / "step" / "1", workdir / "merged"
    write_step(step, inputs.flat)  # also warms Orbax and TensorStore up for both sides

    def clear() -> None:
        shutil.rmtree(out, ignore_errors=True)

    on_disk = {
        "floor_disk": lambda: floor_disk(step, out, inputs, "float32"),
        "engine_disk": lambda: api.merge_checkpoint(step, output=out, lora=inputs.resolved, overwrite=True),
    }
    runs.update(measure_all(on_disk, r, warmup=False, setup=clear))
    clear()
    shutil.rmtree(step.parent)
    profile = kernel_profile(inputs, r)
    runs["naive_depth1"] = measure(lambda: naive_merge(one, "float32"), 1)
    runs["naive"] = measure(lambda: naive_merge(inputs, "float32"), r)  # last: the largest device peak
    return {
        "depth": args.depth,
        "adapted_params": inputs.adapted_params,
        "tree_bytes": nbytes(inputs.flat),
        "tree_bytes_depth1": nbytes(one.flat),
        "base_bytes": sum(inputs.flat[a.base_path].nbytes for a in inputs.adapters),
        "largest_slice_f32_bytes": largest_slice_f32_bytes(inputs),
        "runs": runs,
        "max_rel_err": report.max_rel_err,
        "weights": [{"path": w.path, "seconds": w.seconds, "params": int(np.prod(w.shape))} for w in report.weights],
        "profile": profile,
    }


# ---------------------------------------------------------------------------------------------------------------
# Section `peft`


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


# ---------------------------------------------------------------------------------------------------------------
# Section `save`: a save with merge-on-save against one without; the streamed merge's memory


def section_save(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    from openpi_merge_plugin import orbax_stream

    experts = experts_for(args)
    out = _saves(experts, args.depth, workdir, repeats=args.repeats)
    # The streamed merge's memory at its steady state and at twice that depth: does it grow with the model?
    # Also with no write buffer (`host_buffer_mib=0`): the engine's own memory, without written data waiting for
    # TensorStore.
    mem, more, mem0, more0 = (
        _saves(experts, depth, workdir, repeats=1, without=False, warmup=False, buffers={"merged": buffer})
        for buffer in (orbax_stream.MAX_INFLIGHT_BYTES, 0)
        for depth in (args.memory_depth, 2 * args.memory_depth)
    )
    # What the write buffer buys: time and memory at the measured depth, per buffer size, the sizes taking turns.
    sizes = sorted({0, orbax_stream.MAX_INFLIGHT_BYTES >> 20, *BUFFER_SWEEP_MIB})
    sweep = _saves(
        experts,
        args.memory_depth,
        workdir,
        repeats=2,
        without=False,
        warmup=False,
        buffers={str(mib): mib << 20 for mib in sizes},
    )
    return {
        **out,
        "depth": args.depth,
        "memory_depth": args.memory_depth,
        "host_buffer_mib": orbax_stream.MAX_INFLIGHT_BYTES >> 20,
        "buffer_sweep": {str(mib): sweep[str(mib)] for mib in sizes},
        "merged_mem": mem["merged"],
        "tree_bytes_mem": mem["tree_bytes"],
        "merged_more": more["merged"],
        "tree_bytes_more": more["tree_bytes"],
        "merged_mem_nobuffer": mem0["merged"],
        "merged_more_nobuffer": more0["merged"],
    }


def _saves(
    experts: tuple[Expert, ...],
    depth: int,
    workdir: pathlib.Path,
    *,
    repeats: int,
    without: bool = True,
    warmup: bool = True,
    buffers: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Times openpi's `params` item save and the `merged` item's write of the same live params (jax.Arrays).

    `buffers` (name -> `host_buffer_bytes`): one merged write per entry, under that name; by default one, "merged",
    with the default write buffer.
    """
    import jax
    import orbax.checkpoint as ocp

    from openpi_merge_plugin import api
    from openpi_merge_plugin import engine
    from openpi_merge_plugin import orbax_stream
    from openpi_merge_plugin import serving
    from openpi_merge_plugin import sources

    inputs = merge_inputs(experts, depth)
    params = jax.tree.map(jax.device_put, inputs.params)  # as in training: jax.Arrays on the device
    jax.block_until_ready(params)
    counter = iter(range(1_000_000))

    def fresh() -> pathlib.Path:
        d = workdir / f"save{next(counter)}"
        d.mkdir()
        return d

    def clean() -> None:  # untimed: removes what the previous run wrote
        for d in workdir.glob("save*"):
            shutil.rmtree(d)

    def save_params() -> None:
        with ocp.PyTreeCheckpointer() as ckptr:
            ckptr.save(fresh() / "params", {"params": params})

    def merged_write(host_buffer_bytes: int) -> Callable[[], None]:
        def write() -> None:
            # What the `merged` item's handler does with openpi's live params (merged_item._merge).
            d = fresh()
            source = sources.InMemorySource(params)
            api.write_merged(
                d,
                source,
                inputs.adapters,
                inputs.resolved,
                engine.MergeOptions(),
                source_info={},
                output_path=d,
                serving_config=serving.ServingConfig(None, "benchmark"),
                host_buffer_bytes=host_buffer_bytes,
            )

        return write

    buffers = {"merged": orbax_stream.MAX_INFLIGHT_BYTES} if buffers is None else buffers
    fns = {"without": save_params} if without else {}
    fns.update({name: merged_write(size) for name, size in buffers.items()})
    out: dict[str, Any] = measure_all(fns, repeats, warmup=warmup, setup=clean)
    clean()
    out["tree_bytes"] = nbytes(inputs.flat)
    out["largest_slice_f32_bytes"] = largest_slice_f32_bytes(inputs)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section `serving` (needs openpi): LLM forward passes, LoRA config against the merged params


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

    from openpi_merge_plugin import engine
    from openpi_merge_plugin import sources

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


# ---------------------------------------------------------------------------------------------------------------
# Section `train` (needs openpi and its scripts/train.py): saves of a real tiny training run, merge on and off


def section_train(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    import openpi

    train_py = pathlib.Path(openpi.__file__).resolve().parents[2] / "scripts" / "train.py"
    if not train_py.is_file():
        return {"skipped": f"openpi's scripts/train.py not found next to {openpi.__file__}"}
    out = {}
    for name, flags in (("merge", []), ("no_merge", ["--no-merge-lora-on-save"])):
        cmd = [sys.executable, str(RUNNER), str(train_py), "debug_lora", "--exp-name", name]
        cmd += ["--checkpoint-base-dir", str(workdir / "ckpt"), "--assets-base-dir", str(workdir / "assets")]
        # repeats + 1 saves: the first compiles the merge kernels, so it is reported on its own.
        cmd += ["--batch-size", "8", "--num-train-steps", str(2 * args.repeats + 3), "--save-interval", "2"]
        cmd += ["--keep-period", "None", *flags]
        env = {**os.environ, "WANDB_MODE": "disabled", "JAX_ENABLE_COMPILATION_CACHE": "false"}
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=workdir)
        log = proc.stdout + proc.stderr
        if proc.returncode != 0:
            return {"skipped": f"train.py failed: {log.strip().splitlines()[-1] if log.strip() else proc.returncode}"}
        out[name] = {
            "wall": time.perf_counter() - start,
            "blocking": [
                float(x) for x in re.findall(r"'checkpoint_manager_blocking_duration_secs': ([0-9.e+-]+)", log)
            ],
            "merge_seconds": [
                float(x) for x in re.findall(r"Merged the LoRA adapters of step \d+ .* in ([0-9.]+)s", log)
            ],
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Section `cli`: the older whole-process table (CLI under /usr/bin/time -v)


def section_cli(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    cli = [sys.executable, "-m", "openpi_merge_plugin.cli", "--no-progress", "--overwrite"]
    step = workdir / "tiny" / "2"
    shutil.copytree(FIXTURE_STEP, step)
    rows = [
        (
            "bundled example (lora-tiny, 10 weights)",
            *_time_v([*cli, str(step), "--lora-config", str(REPO / "configs" / "lora_tiny_fixture.json")]),
        )
    ]
    if not args.tiny:
        layout = {
            p: v
            for p, v in benchmark_full_size.training_layout(18).items()
            if p.startswith((f"{LAYERS}mlp/gating_einsum", f"{LAYERS}pre_attention_norm/"))
        }
        big = workdir / "full" / "2"
        write_step(big, {p.removesuffix("/value"): x for p, x in random_params(layout).items()})
        rows.append(("pi0 gemma_2b `gating_einsum`, 18 layers, rank 16", *_time_v([*cli, str(big), "--alpha", "16"])))
    return {"rows": rows}


def _time_v(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb * 1024


# ---------------------------------------------------------------------------------------------------------------
# Orchestration


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "merge": lambda args, plat, workdir: section_merge(args, workdir),
    "peft": lambda args, plat, workdir: section_peft(args, accelerator=plat != "cpu"),
    "save": lambda args, plat, workdir: section_save(args, workdir),
    "serving": lambda args, plat, workdir: section_serving(args),
    "train": lambda args, plat, workdir: section_train(args, workdir),
    "cli": lambda args, plat, workdir: section_cli(args, workdir),
}


def run_child(args: Args) -> None:
    import jax

    plat, section = args.child.split(":")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix=f"bench-{section}-") as tmp:
        result = SECTIONS[section](args, plat, pathlib.Path(tmp))
    result["device"] = str(jax.devices()[0].device_kind) + f" ({jax.default_backend()})"
    args.child_out.write_text(json.dumps(result))


def spawn(args: Args, python: pathlib.Path, plat: str, section: str) -> dict[str, Any]:
    """Runs one section in a fresh process on one JAX platform; returns its JSON (or why it did not run)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.pop("XLA_FLAGS", None)
    if args.tiny:  # tiny numbers mean nothing; compiling dominates, and compiles 3x faster unoptimised
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    if plat == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.pop("JAX_PLATFORMS", None)
    if section in OPENPI_SECTIONS:
        env["OPENPI_MERGE_PLUGIN_DISABLE"] = "0" if section == "train" else "1"
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [str(python), str(pathlib.Path(__file__).resolve()), *_forward_args(args)]
        cmd += ["--child", f"{plat}:{section}", "--child-out", f.name]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        logger.info("%s on %s: %.0fs", section, plat, time.perf_counter() - start)
        if proc.returncode != 0:
            last = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit {proc.returncode}"]
            logger.warning("%s on %s failed:\n%s", section, plat, proc.stderr[-3000:])
            how = "killed" if proc.returncode < 0 else f"exit {proc.returncode}"
            return {"skipped": f"failed ({how}): {last[0][:200]}"}
        return json.loads(pathlib.Path(f.name).read_text())


def _forward_args(args: Args, *, workdir: bool = True) -> list[str]:
    out = ["--depth", str(args.depth), "--prefix-depth", str(args.prefix_depth), "--repeats", str(args.repeats)]
    out += ["--serving-repeats", str(args.serving_repeats), "--memory-depth", str(args.memory_depth)]
    if args.tiny:
        out.append("--tiny")
    if workdir and args.workdir is not None:
        out += ["--workdir", str(args.workdir)]
    return out


def find_openpi_python(args: Args) -> tuple[pathlib.Path | None, str]:
    candidates = [args.openpi_python] if args.openpi_python else [pathlib.Path(sys.executable)]
    for python in candidates:
        proc = subprocess.run([str(python), "-c", "import openpi.models.gemma"], capture_output=True, check=False)
        if proc.returncode == 0:
            return python, ""
    return None, "openpi is not importable here (pass --openpi-python PYTHON of an environment with openpi)"


def accelerator_platform() -> tuple[str | None, str]:
    """The default JAX backend when it is not the CPU; else None and why."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import jax; d = jax.devices()[0]; print(jax.default_backend(), '|', d.device_kind, '|', len(jax.devices()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return None, "JAX could not start"
    backend, kind, count = (s.strip() for s in proc.stdout.strip().splitlines()[-1].split("|"))
    if backend == "cpu":
        return None, "no accelerator visible to JAX on this machine"
    return backend, f"{kind} x{count} ({backend})"


def main(args: Args) -> None:
    if args.child is not None:
        run_child(args)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    raw = args.output.with_suffix(".json")
    data = json.loads(args.from_json.read_text()) if args.from_json else measure_everything(args, raw)
    doc = benchmark_report.render(data["meta"], data["results"], data["platforms"], data["load"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(doc)
    print(doc, end="")


def measure_everything(args: Args, raw: pathlib.Path) -> dict[str, Any]:
    """Runs every section on every platform; the raw results go to `raw` after each (re-render with --from-json)."""
    started = dt.datetime.now(dt.UTC)
    accel, accel_note = accelerator_platform() if args.accelerator else (None, "not requested")
    meta = {
        "machine": describe_machine(),
        "accelerator": None,
        "accelerator_note": accel_note,
        "sections": list(args.sections),
        "command": " ".join(["python scripts/benchmark.py", *_forward_args(args, workdir=False)]),
        "started": f"{started:%Y-%m-%d %H:%M}",
        "repeats": args.repeats,
        "depth": args.depth,
        "sizes": "tiny widths (--tiny)" if args.tiny else "pi0's real layer sizes (openpi 15a9616's pi0_lora tree)",
        "experts": [dataclasses.asdict(e) for e in experts_for(args)],
        "pi0_params_bytes": None if args.tiny else pi0_params_bytes(),
    }
    platforms = ["cpu", *([accel] if accel else [])]
    openpi_python, openpi_note = find_openpi_python(args) if set(args.sections) & set(OPENPI_SECTIONS) else (None, "")
    meta["openpi_python"] = str(openpi_python) if openpi_python else None
    data: dict[str, Any] = {"meta": meta, "platforms": platforms, "results": {p: {} for p in platforms}, "load": []}
    raw.parent.mkdir(parents=True, exist_ok=True)
    with LoadMonitor() as monitor:
        for plat in platforms:
            for section in args.sections:
                start = time.perf_counter()
                mark = monitor.mark()
                data["results"][plat][section] = _run_section(args, plat, section, openpi_python, openpi_note)
                data["load"].append({"platform": plat, "section": section, "seconds": time.perf_counter() - start})
                data["load"][-1].update(monitor.since(mark))
                if accel:
                    meta["accelerator"] = data["results"][accel].get("merge", {}).get("device", accel)
                meta["machine"]["load_end"] = os.getloadavg()
                raw.write_text(json.dumps(data, indent=1))
    return data


def pi0_params_bytes() -> int:
    """Bytes of the params of a pi0 LoRA training checkpoint (frozen weights bf16, the rest fp32)."""
    import ml_dtypes  # noqa: F401  (numpy learns the name 'bfloat16')

    return nbytes(benchmark_full_size.training_layout(pi0_experts()[1]))


class LoadMonitor:
    """Samples, every `interval` s, the CPU used by processes outside this one's tree, and the load average."""

    def __init__(self, interval: float = 2.0):
        import threading

        self._interval = interval
        self._samples: list[tuple[float, float]] = []  # (other processes' CPU in cores, 1-min load average)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> int:
        return len(self._samples)

    def since(self, mark: int) -> dict[str, float]:
        samples = self._samples[mark:] or [(0.0, os.getloadavg()[0])]
        others = [o for o, _ in samples]
        return {
            "others_cores_mean": sum(others) / len(others),
            "others_cores_max": max(others),
            "loadavg_max": max(load for _, load in samples),
        }

    def _run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        before, t0 = _process_ticks(), time.perf_counter()
        while not self._stop.wait(self._interval):
            after, t1 = _process_ticks(), time.perf_counter()
            mine = _descendants(os.getpid(), {pid: ppid for pid, (ppid, _) in after.items()})
            used = sum(t - before.get(pid, (0, t))[1] for pid, (_, t) in after.items() if pid not in mine)
            self._samples.append((used / hz / (t1 - t0), os.getloadavg()[0]))
            before, t0 = after, t1


def _process_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system CPU ticks so far)."""
    out = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _descendants(root: int, parent: dict[int, int]) -> set[int]:
    out = {root}
    for pid in parent:
        chain, p = [], pid
        while p not in out and p in parent and p > 1:
            chain.append(p)
            p = parent[p]
        if p in out:
            out.update(chain)
    return out


def _run_section(args: Args, plat: str, section: str, openpi_python, openpi_note: str) -> dict[str, Any]:
    if section in OPENPI_SECTIONS:
        if openpi_python is None:
            return {"skipped": openpi_note}
        if section == "train" and args.tiny:
            return {"skipped": "not run with --tiny (two openpi training runs take minutes)"}
        return spawn(args, openpi_python, plat, section)
    if section == "cli" and plat != "cpu":
        return {"skipped": "the whole-process table runs on the CPU only"}
    if section == "peft":
        import importlib.util

        missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            return {"skipped": f"{' and '.join(missing)} not installed (pip install -e '.[bench]')"}
    return spawn(args, pathlib.Path(sys.executable), plat, section)


def describe_machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "versions": {n: version(n) for n in ("jax", "jaxlib", "numpy", "orbax-checkpoint", "torch", "peft")},
        "load_start": os.getloadavg(),
        "busy_start": busy_processes(),
    }


def busy_processes(min_cpu: float = 10.0, seconds: float = 1.0) -> list[str]:
    """Other processes that used at least `min_cpu` % of a core over the next `seconds`, busiest first."""
    before = _process_ticks()
    time.sleep(seconds)
    after = _process_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (_, t) in after.items():
        share = 100.0 * (t - before.get(pid, (0, t))[1]) / hz / seconds
        if pid != os.getpid() and share >= min_cpu:
            with contextlib.suppress(OSError):
                cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                busy.append((share, f"{share:.0f}% {cmd[:100]}"))
    return [b for _, b in sorted(busy, reverse=True)][:5]


if __name__ == "__main__":
    main(tyro.cli(Args))
