"""One section in a fresh process on one JAX platform: the parent's spawn, and the child's run."""

from __future__ import annotations

from collections.abc import Callable
import json
import logging
import os
import pathlib
import subprocess
import tempfile
import time
from typing import Any

from benchmarks.cli import section_cli
from benchmarks.config import OPENPI_SECTIONS
from benchmarks.config import REPO
from benchmarks.config import SCRIPT
from benchmarks.config import Args
from benchmarks.merge import section_merge
from benchmarks.merge_on_save import section_merge_on_save
from benchmarks.peft_merge import section_peft
from benchmarks.save import section_save
from benchmarks.serving import section_serving
from benchmarks.train import section_train

logger = logging.getLogger("benchmark")


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "merge": lambda args, plat, workdir: section_merge(args, workdir),
    "peft": lambda args, plat, workdir: section_peft(args, accelerator=plat != "cpu"),
    "save": lambda args, plat, workdir: section_save(args, workdir),
    "merge_on_save": lambda args, plat, workdir: section_merge_on_save(args, workdir),
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
        cmd = [str(python), str(SCRIPT), *_forward_args(args)]
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
