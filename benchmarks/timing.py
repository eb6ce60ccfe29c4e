"""Measuring: times and peak extra memory (host and device) of the benchmarked functions."""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import ctypes
import gc
import time
from typing import Any


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class HostPeak:
    """Peak resident memory above the level at entry (Linux: resets VmHWM through /proc/self/clear_refs).

    Free heap memory is handed back first (glibc `malloc_trim`), so that what the measured call reuses of it counts.
    """

    extra: int | None = None

    def __enter__(self) -> HostPeak:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._before = _status_kib("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is not None:
            self.extra = max(0, _status_kib("VmHWM") - self._before) * 1024


def device_stat(key: str) -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get(key)


def measure(fn: Callable[[], Any], repeats: int, *, label: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """`measure_all` of one function."""
    out = measure_all({"fn": fn}, repeats, **kwargs)["fn"]
    return out if label is None else {**out, "label": label}


def measure_all(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    *,
    warmup: bool = True,
    setup: Callable[[], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times each function (result blocked on), the functions taking turns run by run, so that a change in the
    machine's load hits them alike. Per function: times, peak host memory above the level at the start of a run
    (max over runs), and peak device memory above the level before its first run.

    Devices only keep a lifetime peak, so where the backend reports one, each function first runs once alone, in
    the given order: callers list them in increasing order of device use.
    """
    import jax

    def run(fn: Callable[[], Any]) -> tuple[float, int | None]:
        if setup is not None:
            setup()
        with HostPeak() as peak:
            start = time.perf_counter()
            result = fn()
            jax.block_until_ready(result)
            elapsed = time.perf_counter() - start
            del result
        return elapsed, peak.extra

    device: dict[str, int] = {}
    if device_stat("peak_bytes_in_use") is not None:
        for name, fn in fns.items():
            before = device_stat("bytes_in_use")
            run(fn)
            device[name] = device_stat("peak_bytes_in_use") - before
    elif warmup:
        for fn in fns.values():
            run(fn)
    out = {name: {"times": [], "host": [], "device_extra": device.get(name)} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            elapsed, host = run(fn)
            out[name]["times"].append(elapsed)
            out[name]["host"].append(host)
    for res in out.values():
        host = res.pop("host")
        res["host_extra"] = None if None in host else max(host)
    return out
