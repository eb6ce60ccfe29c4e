"""What `python scripts/benchmark.py` takes (`Args`), the constants of its runs, and gemma experts' dims."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal

from benchmarks import full_size

REPO = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "benchmark.py"  # the command; each section runs it again in a child process
TREE = full_size.TREE  # openpi 15a9616's pi0_lora params tree (shapes only)
LAYERS = full_size.LLM_LAYERS
FIXTURE_STEP = REPO / "tests" / "data" / "openpi-15a9616" / "lora-tiny" / "checkpoint" / "2"
RUNNER = REPO / "tests" / "openpi_support" / "run_openpi_script.py"
PI0_PREFIX_TOKENS = 3 * 256 + 48  # three 224px images (16x16 patches each) + max_token_len, pi0's inference prefix
PI0_SUFFIX_TOKENS = 1 + 50  # state token + action_horizon
Section = Literal["merge", "peft", "save", "merge_on_save", "serving", "train", "cli"]
ALL_SECTIONS: tuple[Section, ...] = ("merge", "peft", "save", "merge_on_save", "serving", "train")
OPENPI_SECTIONS = ("serving", "train")
# Write buffers (`host_buffer_mib`) measured in section 4 besides none and the default.
BUFFER_SWEEP_MIB = (128, 512)


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
    # Measure only `sections` and put their results into the earlier run's raw results (the .json next to
    # `output`), keeping the other sections' results; the page says which sections were measured again, when.
    update: bool = False
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
