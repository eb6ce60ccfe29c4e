"""Full-size checkpoints on this machine: the streaming merge of a pi0 LoRA step vs a naive restore-convert-save
copy, and the exports of it and of a non-LoRA pi0.5 checkpoint vs their I/O floor.

    python scripts/benchmark_full_size.py run --workdir /path/with/40GB/free

Builds random pi0 LoRA training checkpoints in openpi's exact layout (every leaf of openpi's `pi0_lora` params tree,
frozen LLM weights bf16, adapters and the rest fp32, leaves ending in `value` as `save_state` writes them) at half
depth (9 of 18 LLM layers) and full depth, then measures, each in a child process under `/usr/bin/time -v`:

- naive copy: `PyTreeCheckpointer().restore` of the whole params item, adapted weights converted to float32, LoRA
  leaves dropped, `PyTreeCheckpointer().save` (the I/O of a merge without any math);
- `openpi-merge-lora` (streaming, float32 output, verification on);
- at full depth, the I/O floor of a PyTorch export (every leaf of the step read once, widened to float32, written to
  one file) and `openpi-merge-lora export STEP --format pytorch` from the LoRA step (one pass: merged per slice,
  laid out, written, read back), with its ratio to the floor.

With `--plain` (the default) it first builds a non-LoRA pi0.5 checkpoint in openpi's released layout (`params/` of
every leaf of openpi's `pi05` tree, random float32, no `value` suffix; `assets/` without norm stats, as a base
model) and measures its I/O floor, then `export CHECKPOINT --format pytorch` and `--format lerobot` (with
`--norm-stats`), float32, no config, each with its ratio to the floor and its peak RSS.
`... run --workdir W --no-lora` measures that case alone.

`--step` (`--plain-checkpoint`) measures a full-depth LoRA step (a non-LoRA checkpoint) built before
(`full_size.build_step`, `full_size.build_plain`) instead of building one; `--full-only` skips the half-depth case.

At half depth it also checks that the streamed output equals, bitwise, what the in-memory path produces
(`merge_params` + `params_io.save_params`, one adapted weight at a time so that the check itself fits in memory).
Prints a markdown table.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # benchmarks/, next to scripts/
from benchmarks import full_size

if __name__ == "__main__":
    full_size.main()
