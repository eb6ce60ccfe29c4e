"""Orchestration: every section on every platform, the raw results, the markdown."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from benchmarks.child import _forward_args
from benchmarks.child import run_child
from benchmarks.child import spawn
from benchmarks.config import ALL_SECTIONS
from benchmarks.config import OPENPI_SECTIONS
from benchmarks.config import Args
from benchmarks.layout import experts_for
from benchmarks.layout import pi0_params_bytes
from benchmarks.machine import LoadMonitor
from benchmarks.machine import describe_machine
from benchmarks.report.page import render


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
    if args.from_json:
        data = json.loads(args.from_json.read_text())
    elif args.update:
        data = update(json.loads(raw.read_text()), measure_everything(args, raw.with_suffix(".update.json")))
        raw.write_text(json.dumps(data, indent=1))
        raw.with_suffix(".update.json").unlink()
    else:
        data = measure_everything(args, raw)
    doc = render(data["meta"], data["results"], data["platforms"], data["load"])
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
        "command": " ".join(
            [
                "python scripts/benchmark.py",
                *_forward_args(args, workdir=False),
                *(["--sections", *args.sections] if tuple(args.sections) != ALL_SECTIONS else []),
            ]
        ),
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


def update(earlier: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`earlier`'s raw results with the sections measured in `new` replaced by `new`'s (`--update`)."""
    sections = new["meta"]["sections"]
    for plat in new["platforms"]:
        if plat not in earlier["platforms"]:
            earlier["platforms"].append(plat)
        earlier["results"].setdefault(plat, {}).update(new["results"][plat])
    earlier["load"] = [x for x in earlier["load"] if x["section"] not in sections] + new["load"]
    meta = earlier["meta"]
    meta["sections"] = [*meta["sections"], *(s for s in sections if s not in meta["sections"])]
    meta.setdefault("updates", []).append(
        {
            "sections": sections,
            "command": new["meta"]["command"] + " --update",
            "started": new["meta"]["started"],
            "openpi_python": new["meta"].get("openpi_python"),
            "load_start": new["meta"]["machine"]["load_start"],
            "load_end": new["meta"]["machine"]["load_end"],
        }
    )
    return earlier


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
