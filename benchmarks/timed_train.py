"""Runs openpi's scripts/train.py (as the tests do: tests/openpi_support/run_openpi_script.py) and times, from
outside, each call of `openpi.training.checkpoints.save_state`: how long the training loop waits per save.

    python benchmarks/timed_train.py OPENPI_REPO/scripts/train.py CONFIG --exp-name x ...

Prints one line per save, `timed_train: save_state step N blocked S s`, whatever the plugin does inside (the
merge, a wait for the previous merge, Orbax's own wait for its previous save).
"""

import pathlib
import runpy
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "openpi_support"))

import openpi.training.checkpoints as checkpoints  # patched by the plugin as it is imported
import run_openpi_script  # noqa: F401  (the tiny SigLIP and the tests' variants, as in the tests)

_save_state = checkpoints.save_state


def _timed_save_state(checkpoint_manager, state, data_loader, step, *args, **kwargs):
    start = time.perf_counter()
    try:
        return _save_state(checkpoint_manager, state, data_loader, step, *args, **kwargs)
    finally:
        print(f"timed_train: save_state step {step} blocked {time.perf_counter() - start:.4f} s", flush=True)


checkpoints.save_state = _timed_save_state

if __name__ == "__main__":
    script, *argv = sys.argv[1:]
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
