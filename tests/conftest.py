"""Shared fixtures: one tiny random SD model per test session, datasets made per test."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight SD1.x pipeline in diffusers format, built offline once per session."""
    from hcpdiff.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A random-weight SDXL pipeline (two text encoders, text_time conditioning), built offline once per session."""
    from hcpdiff.tools.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_xl") / "tiny_sdxl", seed=0)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A working directory where `cfgs/` resolves as in the repository (the guide runs from the repo root)."""
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or a console command when args[0] is not '-m') as a user would; capture output.

    The command runs in its own session, and on timeout its whole process group is killed: a launcher's workers
    (torchrun, accelerate launch) would otherwise outlive a hung test as orphans.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HCP_DEBUG", None)
    command = [sys.executable, *args] if args[0] == "-m" else args
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C in pytest): leave nothing running
            kill_process_group(proc)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process in `proc`'s group (it was started with start_new_session=True) and reap `proc`."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def find_free_port() -> int:
    """A TCP port free on this machine now (bound to port 0 and released), for a launcher's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port():
    """The `find_free_port` helper: call it for each launcher port a test needs."""
    return find_free_port


@pytest.fixture(scope="session")
def cli():
    """The `run_cli` helper, as a fixture so test modules need no imports from conftest (session-scoped, so a
    module-scoped fixture can share one run among its tests)."""
    return run_cli


def assert_one_error_line(result: subprocess.CompletedProcess) -> str:
    """The run exited with status 2, printed exactly one `error:` line and no traceback; returns that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def one_error_line():
    """`assert_one_error_line`, as a fixture so test modules need no imports from conftest."""
    return assert_one_error_line
