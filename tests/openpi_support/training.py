"""Running openpi's own scripts (train.py, serve_policy.py) in subprocesses, for the openpi-gated tests."""

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import openpi
import pytest

OPENPI_REPO = pathlib.Path(os.environ.get("OPENPI_REPO", pathlib.Path(openpi.__file__).resolve().parents[2]))
TRAIN_SCRIPT = OPENPI_REPO / "scripts" / "train.py"
SERVE_SCRIPT = OPENPI_REPO / "scripts" / "serve_policy.py"
RUNNER = pathlib.Path(__file__).resolve().parent / "run_openpi_script.py"
# A tiny train.py run takes 1 to 2 minutes on 2 cores; one that has not finished in this time hangs.
TRAIN_TIMEOUT = float(os.environ.get("OPENPI_MERGE_TEST_TRAIN_TIMEOUT", "480"))


def env(devices: int = 1, kill: str = "", **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        **extra,
        "OPENPI_MERGE_TEST_KILL": kill,
        "XLA_FLAGS": _xla_flags(devices),
        "JAX_PLATFORMS": "cpu",
        "WANDB_MODE": "disabled",
        # openpi's train.py turns on JAX's persistent compilation cache (~/.cache/jax). On CPU, a hit there changes
        # the training numerics, and `train.py --resume` then dies with heap corruption (signal 11) on its first
        # resumed step; compiled afresh, every resume works. Each run compiles its own programs.
        "JAX_ENABLE_COMPILATION_CACHE": "false",
    }


def _xla_flags(devices: int) -> str:
    """Fake CPU devices for FSDP, on XLA's classic CPU runtime.

    On JAX 0.5.3's default CPU runtime (thunks), `my_pi0_lora` over 4 fake devices with EMA deadlocked in 2 of 4 runs
    reported on 2 cores, and in 2 of 3 of ours: train.py idle after "Step 0"; gdb shows one thread per device blocked
    in `InProcessCommunicator::AllReduce` (inside a while loop's body, run on the intra-op pool) and the 4 device
    executions waiting on them. As many waiters as devices and none completes, so they wait in different
    all-reduces: the thunk runtime runs a program's independent operations concurrently, and the devices can reach
    their collectives in different orders. It is not a shortage of threads: with a 16-thread pool (PJRT_NPROC=16) it
    hung the same way. The classic runtime runs each device's program in program order, so all devices meet every
    collective in the same order: 4 of 4 such runs finished, in 45 to 109 s (a thunk run that does not hang: 70 s).
    """
    if devices == 1:
        return ""
    return f"--xla_force_host_platform_device_count={devices} --xla_cpu_use_thunk_runtime=false"


def _case() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]


def train(
    base: pathlib.Path,
    config: str,
    exp: str,
    *flags: str,
    devices: int = 1,
    check: bool = True,
    kill: str = "",
    extra_env: dict[str, str] | None = None,
) -> str | tuple[int, str]:
    """Runs openpi's scripts/train.py on `config` (10 steps, saves at 5 and 9); returns its log (and exit code)."""
    cmd = [sys.executable, str(RUNNER), str(TRAIN_SCRIPT), config, "--exp-name", exp]
    cmd += ["--checkpoint-base-dir", str(base / "ckpt"), "--assets-base-dir", str(base / "assets")]
    cmd += ["--batch-size", "8", "--num-train-steps", "10", "--save-interval", "5", *flags]
    # Own process group, output to a file: data loader workers of a killed trainer must not outlive the test.
    log_file = base / f"train-{exp}-{len(list(base.glob('train-*.log')))}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd,
            env=env(devices, kill, **(extra_env or {})),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=base,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=TRAIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            tail = log_file.read_text()[-3000:]
            pytest.fail(
                f"{_case()}: openpi's train.py {config} --exp-name {exp} on {devices} device(s) did not finish in "
                f"{TRAIN_TIMEOUT:.0f}s (OPENPI_MERGE_TEST_TRAIN_TIMEOUT); killed. Its log ({log_file}) ends:\n{tail}",
                pytrace=False,
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = log_file.read_text()
    if check:
        assert proc.returncode == 0, log[-5000:]
        return log
    return proc.returncode, log


def step_dir(base: pathlib.Path, config: str, exp: str, step: int) -> pathlib.Path:
    return base / "ckpt" / config / exp / str(step)


@contextlib.contextmanager
def serve_policy(base: pathlib.Path, config: str, checkpoint: pathlib.Path, timeout: float = 600):
    """Runs openpi's scripts/serve_policy.py on a checkpoint in a fresh process; yields a client of it."""
    from openpi_client import websocket_client_policy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(RUNNER), str(SERVE_SCRIPT), "--port", str(port), "policy:checkpoint"]
    cmd += [f"--policy.config={config}", f"--policy.dir={checkpoint}"]
    log_file = base / f"serve-{config}-{port}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(cmd, env=env(), stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                assert proc.poll() is None, f"serve_policy.py exited with {proc.returncode}:\n{log_file.read_text()}"
                assert time.monotonic() < deadline, f"serve_policy.py did not listen in {timeout}s"
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                time.sleep(1)
            yield websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
