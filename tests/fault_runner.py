"""Runs `openpi-merge-lora` with faults injected, for the crash-safety and race tests.

    python tests/fault_runner.py FAULTS_JSON ARGV...

FAULTS_JSON is a list of {"target": "module:attr.path", "n": N, "action": ..., "match": "..."}: the N-th call of
the target (counting only calls whose first argument, as a string, contains `match`) triggers the action:

    kill_before / kill_after   SIGKILL this process before / after the real call
    kill_half_write            (Path.write_text) write the first half of the text, fsync it, SIGKILL
    barrier                    create the file `arrive`, wait until all files in `wait_for` exist, then call

The functions are replaced in this process only, so no fault hook exists in the package itself.
"""

import functools
import importlib
import inspect
import json
import os
import pathlib
import signal
import sys
import time

BARRIER_TIMEOUT_S = 120
BARRIER_TIMEOUT_EXIT = 3


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _resolve(target: str) -> tuple[object, str]:
    module, _, attrs = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = attrs.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def _trigger(fault: dict, args: tuple) -> bool:
    if fault.get("match") and (not args or fault["match"] not in str(args[0])):
        return False
    fault["seen"] = fault.get("seen", 0) + 1
    return fault["seen"] == fault["n"]


def _before(fault: dict, args: tuple) -> None:
    action = fault["action"]
    if action == "kill_before":
        _kill()
    elif action == "kill_half_write":
        path, text = pathlib.Path(args[0]), args[1]
        with open(path, "w") as f:
            f.write(text[: len(text) // 2])
            f.flush()
            os.fsync(f.fileno())
        _kill()
    elif action == "barrier":
        pathlib.Path(fault["arrive"]).touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while not all(os.path.exists(p) for p in fault["wait_for"]):
            if time.monotonic() > deadline:
                os._exit(BARRIER_TIMEOUT_EXIT)
            time.sleep(0.02)


def _inject(fault: dict) -> None:
    owner, name = _resolve(fault["target"])
    real = getattr(owner, name)

    if inspect.iscoroutinefunction(real):

        @functools.wraps(real)
        async def wrapper(*args, **kwargs):
            hit = _trigger(fault, args)
            if hit:
                _before(fault, args)
            result = await real(*args, **kwargs)
            if hit and fault["action"] == "kill_after":
                _kill()
            return result

    else:

        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            hit = _trigger(fault, args)
            if hit:
                _before(fault, args)
            result = real(*args, **kwargs)
            if hit and fault["action"] == "kill_after":
                _kill()
            return result

    setattr(owner, name, wrapper)


def main() -> int:
    faults, argv = json.loads(sys.argv[1]), sys.argv[2:]
    from openpi_merge_plugin import cli

    for fault in faults:
        _inject(fault)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
