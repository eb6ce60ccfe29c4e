"""Section `cli`: the older whole-process table (CLI under /usr/bin/time -v)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import time
from typing import Any

from benchmarks import full_size
from benchmarks.config import FIXTURE_STEP
from benchmarks.config import LAYERS
from benchmarks.config import REPO
from benchmarks.config import Args
from benchmarks.inputs import write_step
from benchmarks.layout import random_params


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
            for p, v in full_size.training_layout(18).items()
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
