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

import pathlib
import sys

import tyro

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/, next to scripts/
from benchmarks import main
from benchmarks.config import Args

if __name__ == "__main__":
    main.main(tyro.cli(Args))
