"""Section `train` (needs openpi and its scripts/train.py): saves of a real tiny training run, merge on and off."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
from typing import Any

from benchmarks.config import RUNNER
from benchmarks.config import Args


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
