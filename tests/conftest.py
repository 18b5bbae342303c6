"""Shared fixtures: one tiny random SD model per test session, datasets made per test."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import resource
import runpy
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight SD1.x pipeline in diffusers format, built offline once per session."""
    from hcpdiff.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model", seed=0)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """`tiny_models(variant)`: the `make_tiny_model --family <variant>` model (seed 0), built once per session (per
    xdist worker) and shared by every test module that only reads it; a test that changes a model copies it first."""
    from hcpdiff.families import tiny_variant_family

    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            folder = tmp_path_factory.mktemp("tiny_" + variant.replace(".", "_").replace("-", "_"))
            built[variant] = tiny_variant_family(variant).make_tiny(folder / variant, seed=0, variant=variant)
        return built[variant]
    return get


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
    started, cpu_before = time.perf_counter(), _children_cpu()
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
    _log_cli_run(command, proc.returncode, time.perf_counter() - started, _children_cpu() - cpu_before)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module ...` run inside this test process (runpy, `__main__`, same argv), output captured.

    For the many runs that stop at a config or input error: the entry point, its one-line error and exit status
    are exactly the subprocess's, without ~5 s of torch / diffusers imports per run. Training runs that get past
    setup belong in `run_cli` (a real process: accelerate state, signal handlers, threads). State an entry point
    leaves in this process (logging handlers, warning filters, accelerate's singleton, the working directory) is
    put back afterwards.
    """
    assert args[0] == "-m", args
    loggers = [logging.getLogger(name) for name in ("hcpdiff", "hcpdiff.train.log")]
    saved = [(list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    # a fresh interpreter's root logger has no handler, so a library's warning reaches stderr through logging's
    # last-resort handler (which writes to sys.stderr, redirected below); pytest's capture handlers are set aside
    root = logging.getLogger()
    root_handlers, root.handlers = list(root.handlers), []
    stdout, stderr = io.StringIO(), io.StringIO()
    old_cwd, old_argv, old_env = os.getcwd(), sys.argv, dict(os.environ)
    os.chdir(cwd)
    sys.argv = [args[1], *args[2:]]
    os.environ.pop("HCP_DEBUG", None)
    code = 0
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            warnings.simplefilter("ignore")  # as run_cli's PYTHONWARNINGS=ignore
            try:
                runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # what the interpreter would print and exit 1 with
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        root.handlers[:] = root_handlers
        os.environ.clear()
        os.environ.update(old_env)
        for logger, (handlers, level, propagate) in zip(loggers, saved):
            for handler in logger.handlers:
                if handler not in handlers:
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        _reset_accelerate_state()
    return subprocess.CompletedProcess([sys.executable, *args], code, stdout.getvalue(), stderr.getvalue())


def _reset_accelerate_state() -> None:
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _log_cli_run(command: list[str], returncode: int, wall: float, cpu: float) -> None:
    """With HCP_TEST_CLI_LOG=<file>, append one JSON line per CLI run (test, command, wall and CPU seconds): the
    suite's time is mostly these runs, and this says which tests pay for how many."""
    log = os.environ.get("HCP_TEST_CLI_LOG")
    if not log:
        return
    record = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "rc": returncode,
              "wall": round(wall, 2), "cpu": round(cpu, 2), "cmd": " ".join(command[1:4])}
    with open(log, "a") as handle:
        handle.write(json.dumps(record) + "\n")


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


@pytest.fixture(scope="session")
def cli_in_process():
    """The `run_in_process` helper: a CLI run without a new interpreter (session-scoped, so a module-scoped fixture
    can share one run among its tests)."""
    return run_in_process


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
