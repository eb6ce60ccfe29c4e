"""Measure merge time and peak memory: the bundled example, and one full-size pi0 scanned weight.

    python scripts/benchmark.py                       # both
    python scripts/benchmark.py --weight gating_einsum  # which gemma_2b weight to build at full size

Each merge runs as `openpi-merge-lora` in a child process under `/usr/bin/time -v` (wall time, peak RSS of the
whole process, so this includes Python, JAX and Orbax). The full-size case writes a random pi0 LoRA step directory
holding just that weight (bf16 base, fp32 rank-16 adapters, 18 scanned layers, shapes from openpi's gemma_2b_lora)
and merges it with float32 output. Prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

import tyro

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURE_STEP = REPO / "tests" / "data" / "openpi-15a9616" / "lora-tiny" / "checkpoint" / "2"
TREE = REPO / "tests" / "data" / "openpi-15a9616" / "trees" / "pi0_lora.json"


@dataclasses.dataclass
class Args:
    # gemma_2b weight to build at full size (largest: gating_einsum, [18, 2, 2048, 16384]).
    weight: str = "gating_einsum"
    # Skip the full-size case.
    tiny_only: bool = False
    # Where to build the full-size checkpoint (needs ~5 GB free).
    workdir: pathlib.Path | None = None


def _timed(cmd: list[str]) -> tuple[float, float]:
    """Runs cmd under /usr/bin/time -v; returns (wall seconds, peak RSS GiB)."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return wall, rss_kb / 2**20


def _build_full_size_step(step: pathlib.Path, weight: str) -> int:
    import numpy as np

    from openpi_merge_plugin import params_io

    params = json.loads(TREE.read_text())["params"]
    prefix = "PaliGemma/llm/layers/"
    if weight in ("gating_einsum", "linear"):
        base, a, b = (f"{prefix}mlp/{weight}", f"{prefix}mlp/{weight}_lora_a", f"{prefix}mlp/{weight}_lora_b")
    else:
        base, a, b = (f"{prefix}attn/{weight}/{n}" for n in ("w", "lora_a", "lora_b"))
    rng = np.random.default_rng(0)
    flat = {}
    for path, dtype in ((base, "bfloat16"), (a, "float32"), (b, "float32")):
        shape = params[path]["shape"]
        flat[path] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(dtype)
    # A second (small) expert-0 leaf so the tree has something to pass through.
    flat[f"{prefix}pre_attention_norm/scale"] = np.zeros(
        params[f"{prefix}pre_attention_norm/scale"]["shape"], "bfloat16"
    )
    nbytes = int(flat[base].nbytes)
    step.mkdir(parents=True)
    params_io.save_params(step / "params", flat)
    (step / "assets").mkdir()
    return nbytes


def main(args: Args) -> None:
    cli = [sys.executable, "-m", "openpi_merge_plugin.cli", "--no-progress", "--overwrite"]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = pathlib.Path(tmp_name)
        step = tmp / "tiny" / "2"
        shutil.copytree(FIXTURE_STEP, step)
        wall, rss = _timed([*cli, str(step), "--lora-config", str(REPO / "configs" / "lora_tiny_fixture.json")])
        rows.append(("bundled example (lora-tiny, 10 weights)", "0.4 MB", wall, rss))
        if not args.tiny_only:
            step = tmp / "full" / "2"
            nbytes = _build_full_size_step(step, args.weight)
            wall, rss = _timed([*cli, str(step), "--alpha", "16"])
            rows.append(
                (f"pi0 gemma_2b `{args.weight}`, 18 layers, rank 16", f"{nbytes / 2**30:.2f} GiB bf16", wall, rss)
            )

    import jax

    print(
        f"machine: {platform.node()}, {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"devices {jax.devices()}"
    )
    print("| merge | base weight size | wall time (s) | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for name, size, wall, rss in rows:
        print(f"| {name} | {size} | {wall:.1f} | {rss:.2f} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
