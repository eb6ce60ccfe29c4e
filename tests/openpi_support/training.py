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

OPENPI_REPO = pathlib.Path(os.environ.get("OPENPI_REPO", pathlib.Path(openpi.__file__).resolve().parents[2]))
TRAIN_SCRIPT = OPENPI_REPO / "scripts" / "train.py"
SERVE_SCRIPT = OPENPI_REPO / "scripts" / "serve_policy.py"
RUNNER = pathlib.Path(__file__).resolve().parent / "run_openpi_script.py"


def env(devices: int = 1, kill: str = "") -> dict[str, str]:
    return {
        **os.environ,
        "OPENPI_MERGE_TEST_KILL": kill,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}" if devices > 1 else "",
        "JAX_PLATFORMS": "cpu",
        "WANDB_MODE": "disabled",
    }


def train(
    base: pathlib.Path, config: str, exp: str, *flags: str, devices: int = 1, check: bool = True, kill: str = ""
) -> str | tuple[int, str]:
    """Runs openpi's scripts/train.py on `config` (10 steps, saves at 5 and 9); returns its log (and exit code)."""
    cmd = [sys.executable, str(RUNNER), str(TRAIN_SCRIPT), config, "--exp-name", exp]
    cmd += ["--checkpoint-base-dir", str(base / "ckpt"), "--assets-base-dir", str(base / "assets")]
    cmd += ["--batch-size", "8", "--num-train-steps", "10", "--save-interval", "5", *flags]
    # Own process group, output to a file: data loader workers of a killed trainer must not outlive the test.
    log_file = base / f"train-{exp}-{len(list(base.glob('train-*.log')))}.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, env=env(devices, kill), stdout=out, stderr=subprocess.STDOUT, cwd=base, start_new_session=True
        )
        try:
            proc.wait(timeout=1200)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
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
