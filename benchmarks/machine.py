"""The machine the benchmark runs on, and how busy the rest of it is while it runs."""

from __future__ import annotations

import contextlib
import os
import pathlib
import platform
import time
from typing import Any


class LoadMonitor:
    """Samples, every `interval` s, the CPU used by processes outside this one's tree, and the load average."""

    def __init__(self, interval: float = 2.0):
        import threading

        self._interval = interval
        self._samples: list[tuple[float, float]] = []  # (other processes' CPU in cores, 1-min load average)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self) -> int:
        return len(self._samples)

    def since(self, mark: int) -> dict[str, float]:
        samples = self._samples[mark:] or [(0.0, os.getloadavg()[0])]
        others = [o for o, _ in samples]
        return {
            "others_cores_mean": sum(others) / len(others),
            "others_cores_max": max(others),
            "loadavg_max": max(load for _, load in samples),
        }

    def _run(self) -> None:
        hz = os.sysconf("SC_CLK_TCK")
        before, t0 = _process_ticks(), time.perf_counter()
        while not self._stop.wait(self._interval):
            after, t1 = _process_ticks(), time.perf_counter()
            mine = _descendants(os.getpid(), {pid: ppid for pid, (ppid, _) in after.items()})
            used = sum(t - before.get(pid, (0, t))[1] for pid, (_, t) in after.items() if pid not in mine)
            self._samples.append((used / hz / (t1 - t0), os.getloadavg()[0]))
            before, t0 = after, t1


def _process_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system CPU ticks so far)."""
    out = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out[int(stat.parent.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _descendants(root: int, parent: dict[int, int]) -> set[int]:
    out = {root}
    for pid in parent:
        chain, p = [], pid
        while p not in out and p in parent and p > 1:
            chain.append(p)
            p = parent[p]
        if p in out:
            out.update(chain)
    return out


def describe_machine() -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "-"

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "python": platform.python_version(),
        "versions": {n: version(n) for n in ("jax", "jaxlib", "numpy", "orbax-checkpoint", "torch", "peft")},
        "load_start": os.getloadavg(),
        "busy_start": busy_processes(),
    }


def busy_processes(min_cpu: float = 10.0, seconds: float = 1.0) -> list[str]:
    """Other processes that used at least `min_cpu` % of a core over the next `seconds`, busiest first."""
    before = _process_ticks()
    time.sleep(seconds)
    after = _process_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (_, t) in after.items():
        share = 100.0 * (t - before.get(pid, (0, t))[1]) / hz / seconds
        if pid != os.getpid() and share >= min_cpu:
            with contextlib.suppress(OSError):
                cmd = (
                    pathlib.Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                    .strip()
                )
                busy.append((share, f"{share:.0f}% {cmd[:100]}"))
    return [b for _, b in sorted(busy, reverse=True)][:5]
