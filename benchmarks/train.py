"""Section `train` (needs openpi and its scripts/train.py): saves of a real tiny training run, merge on and off.

Each run is openpi's unmodified scripts/train.py on the shipped `debug_lora` config, through `timed_train.py`, which
times every `save_state` call from outside (the training loop's wait per save, whatever happens inside). Three
runs: merge on save in async mode (the default), in blocking mode, and off; `ROUNDS` times each, taking turns.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks.config import REPO
from benchmarks.config import Args

TIMED_TRAIN = REPO / "benchmarks" / "timed_train.py"
# Train steps between saves: more than a tiny merge takes beside the training on 2 CPU cores (~2 s), as between
# real saves (openpi saves every 1000 steps); a save that comes earlier waits for the previous merge, and the
# section reports that wait.
SAVE_INTERVAL = 10
RUNS = {
    "async": [],
    "blocking": ["--merge-lora.mode", "blocking"],
    "no_merge": ["--no-merge-lora-on-save"],
}
# Each run this many times, the three taking turns, so that a change in the machine's load hits them alike.
ROUNDS = 2


def section_train(args: Args, workdir: pathlib.Path) -> dict[str, Any]:
    import openpi

    train_py = pathlib.Path(openpi.__file__).resolve().parents[2] / "scripts" / "train.py"
    if not train_py.is_file():
        return {"skipped": f"openpi's scripts/train.py not found next to {openpi.__file__}"}
    out: dict[str, Any] = {"save_interval": SAVE_INTERVAL}
    # repeats + 2 saves per run (steps 10, 20, ...): the first merge compiles its kernels (in async mode in the
    # background, so that the second save may wait for it), so a run's first save is reported on its own.
    steps = SAVE_INTERVAL * (args.repeats + 2) + 1
    for round_ in range(ROUNDS):
        for name, flags in RUNS.items():
            exp = f"{name}-{round_}"
            cmd = [sys.executable, str(TIMED_TRAIN), str(train_py), "debug_lora", "--exp-name", exp]
            cmd += ["--checkpoint-base-dir", str(workdir / "ckpt"), "--assets-base-dir", str(workdir / "assets")]
            cmd += ["--batch-size", "8", "--num-train-steps", str(steps), "--save-interval", str(SAVE_INTERVAL)]
            cmd += ["--keep-period", "None", *flags]
            env = {**os.environ, "WANDB_MODE": "disabled", "JAX_ENABLE_COMPILATION_CACHE": "false"}
            start = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=workdir)
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                last = log.strip().splitlines()[-1] if log.strip() else proc.returncode
                return {"skipped": f"train.py failed: {last}"}
            blocking = [float(x) for x in re.findall(r"timed_train: save_state step \d+ blocked ([0-9.e+-]+) s", log)]
            run = out.setdefault(name, {"wall": [], "first": [], "blocking": [], "waits": [], "merge_seconds": []})
            run["wall"].append(time.perf_counter() - start)
            run["first"].append(blocking[0])
            run["blocking"] += blocking[1:]  # the first save of a run is reported on its own
            run["waits"] += [float(x) for x in re.findall(r"waited ([0-9.]+)s for the merged checkpoint", log)]
            run["merge_seconds"] += [
                float(x) for x in re.findall(r"Merged the LoRA adapters of step \d+ .* in ([0-9.]+)s", log)
            ][1:]
    return out
