"""A run folder has one writer, a run never overwrites or deletes another run's steps, a folder the disk refuses is
one error line (never a hang), and a run that fails early leaves no empty folder and no stale temporary files."""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcpdiff.errors import ConfigError
from hcpdiff.folders import make_folder
from hcpdiff.train.exp_dir import (LOCK_NAME, claim_exp_dir, lock_exp_dir, remove_if_no_outputs,
                                   remove_stale_temp_files, unlock_exp_dir)


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    """The id of a running process other than this one."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------------------------- folder creation
def test_exp_dir_under_a_dangling_link_is_one_error_not_a_hang(tmp_path):
    (tmp_path / "exps").symlink_to("/missing/disk")
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        claim_exp_dir(tmp_path / "exps" / "2026-12-06")
    assert time.monotonic() - started < 5
    assert "exp_dir" in str(err.value) and "/missing/disk" in str(err.value) and "does not exist" in str(err.value)


def test_exp_dir_under_a_regular_file_is_one_error(tmp_path):
    (tmp_path / "exps").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"exp_dir: .*'.*exps' is a file, not a folder"):
        claim_exp_dir(tmp_path / "exps" / "run")


def test_exp_dir_on_a_read_only_file_system_is_one_error(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes; the file system's own answer is simulated.
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(ConfigError, match=r"exp_dir: cannot create folder .*: the file system is read-only"):
        claim_exp_dir(tmp_path / "ro" / "run")


def test_existing_exp_dir_still_gets_a_suffix(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run-1").symlink_to("/missing/disk")  # a dangling name is taken too, not retried forever
    assert claim_exp_dir(tmp_path / "run") == tmp_path / "run-2"


def test_cache_dir_that_cannot_be_made_names_its_key(tmp_path):
    (tmp_path / "disk").write_text("a file")
    with pytest.raises(ConfigError, match=r"^data\.dataset1\.cache_dir: cannot create folder .*disk' is a file"):
        make_folder(tmp_path / "disk" / "latents", "data.dataset1.cache_dir")


# ----------------------------------------------------------------------------------------------- the lock
def test_second_writer_is_refused_naming_the_folder_and_the_pid(tmp_path, live_pid):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": live_pid, "host": socket.gethostname()}))
    with pytest.raises(ConfigError) as err:
        lock_exp_dir(tmp_path)
    assert str(tmp_path) in str(err.value) and f"process {live_pid}" in str(err.value)


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "some-other-machine"}))
    with pytest.raises(ConfigError, match="some-other-machine"):
        lock_exp_dir(tmp_path)


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    stale = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": stale, "host": socket.gethostname()}))
    lock = lock_exp_dir(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert any(str(stale) in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    unlock_exp_dir(lock)
    assert not lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary file of the lock left either


def test_unlock_leaves_another_process_lock_alone(tmp_path, live_pid):
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname()}))
    unlock_exp_dir(lock)
    assert lock.exists()


# ----------------------------------------------------------------------------------------------- leftovers
def test_stale_temp_files_are_removed_live_ones_kept(tmp_path, live_pid):
    for sub in ("ckpts", "state"):
        (tmp_path / sub).mkdir()
    stale = [tmp_path / "ckpts" / f"unet-3.safetensors.tmp-{dead_pid()}",
             tmp_path / "state" / f"step-3.pt.tmp-{dead_pid()}"]
    live = tmp_path / "ckpts" / f"unet-4.safetensors.tmp-{live_pid}"
    keep = tmp_path / "ckpts" / "unet-2.safetensors"
    for path in [*stale, live, keep]:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted(stale)
    assert live.exists() and keep.exists() and not any(p.exists() for p in stale)


def test_failed_run_folder_is_removed_only_when_it_holds_no_outputs(tmp_path):
    empty, used = tmp_path / "empty", tmp_path / "used"
    for folder in (empty, used):
        (folder / "ckpts").mkdir(parents=True)
        (folder / "cfg.yaml").write_text("a: 1")
    (used / "ckpts" / "unet-1.safetensors").write_bytes(b"x")
    assert remove_if_no_outputs(empty) and not empty.exists()
    assert not remove_if_no_outputs(used) and (used / "ckpts" / "unet-1.safetensors").exists()


# ----------------------------------------------------------------------------------------------- as a user runs it

@pytest.mark.e2e
def test_cli_exp_dir_under_a_dangling_link(workdir, demo_args, cli, error_line):
    (workdir / "exps").symlink_to("/missing/disk")
    result = cli([*demo_args, "train.train_steps=1", "exp_dir=exps/run"], cwd=workdir, timeout=120)  # it once hung
    assert result.returncode == 2
    assert "/missing/disk" in error_line(result.stderr)


@pytest.mark.e2e
def test_cli_failed_runs_leave_no_empty_folder(workdir, demo_args, cli_in_process, tiny_model, error_line):
    """A model that does not load, and a cache_dir the disk refuses (found after the folder was made): one error
    line each, and no experiment folder is left behind."""
    bad_model = cli_in_process([*demo_args, "train.train_steps=1", "exp_dir=exps/bad_model",
                                f"model.pretrained_model_name_or_path={workdir / 'no_model'}"], cwd=workdir)
    assert bad_model.returncode == 2
    assert "no_model" in error_line(bad_model.stderr)
    (workdir / "disk").write_text("a file")
    bad_cache = cli_in_process([*demo_args, "train.train_steps=1", "exp_dir=exps/bad_cache",
                                "data.dataset1.cache_latents=true", "data.dataset1.cache_dir=disk/latents"],
                               cwd=workdir)
    assert bad_cache.returncode == 2
    line = error_line(bad_cache.stderr)
    assert "data.dataset1.cache_dir" in line and "disk/latents" in line
    assert not (workdir / "exps/bad_model").exists() and not (workdir / "exps/bad_cache").exists()


@pytest.mark.e2e
def test_cli_resume_refuses_later_steps_and_pointless_lengths(workdir, demo_args, cli_in_process, error_line):
    """Resuming state/step-2.pt of a finished 4-step run: refused naming steps 3, 4 (the folder would mix two runs);
    with train.resume_overwrite=true it replaces them, and ckpt_keep keeps this run's newest writes. A resume whose
    train_steps is not above the saved step is refused naming both numbers."""
    first = cli_in_process([*demo_args, "train.train_steps=4", "train.save_step=1", "exp_dir=exps/run"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = workdir / "exps/run/ckpts"
    original_4 = load_file(ckpts / "unet-4.safetensors")

    nothing = cli_in_process([*demo_args, "train.train_steps=4", "train.resume=exps/run"], cwd=workdir)
    assert nothing.returncode == 2
    line = error_line(nothing.stderr)
    assert "step 4" in line and "train.train_steps is 4" in line

    back = cli_in_process([*demo_args, "train.train_steps=4", "train.resume=exps/run/state/step-2.pt"], cwd=workdir)
    assert back.returncode == 2
    line = error_line(back.stderr)
    assert "3, 4" in line and "train.resume_overwrite=true" in line
    assert sorted(p.name for p in ckpts.iterdir()) == [f"unet-{n}.safetensors" for n in (1, 2, 3, 4)]

    leftover = ckpts / f"unet-9.safetensors.tmp-{dead_pid()}"  # a killed run's unfinished write
    leftover.write_bytes(b"partial")
    again = cli_in_process([*demo_args, "train.train_steps=4", "train.save_step=1", "train.ckpt_keep=2",
                            "train.resume_overwrite=true",
                            "train.resume=exps/run/state/step-2.pt"], cwd=workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["unet-3.safetensors", "unet-4.safetensors"]
    assert sorted(p.name for p in (workdir / "exps/run/state").iterdir()) == ["step-3.pt", "step-4.pt"]
    again_4 = load_file(ckpts / "unet-4.safetensors")  # steps 3-4 trained again, exactly as the first time
    assert again_4.keys() == original_4.keys() and all(torch.equal(again_4[k], original_4[k]) for k in again_4)
    assert not (workdir / "exps/run" / LOCK_NAME).exists()


@pytest.mark.e2e
def test_cli_resume_while_the_run_still_trains_is_refused(workdir, demo_args, cli_in_process, error_line):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HCP_DEBUG", None)
    running = subprocess.Popen([sys.executable, *demo_args, "train.train_steps=500", "train.save_step=1",
                                "exp_dir=exps/live"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        state = workdir / "exps/live/state/step-1.pt"
        deadline = time.time() + 180
        while time.time() < deadline and not state.exists() and running.poll() is None:
            time.sleep(0.2)
        assert state.exists(), "the first run wrote no state"
        resumed = cli_in_process([*demo_args, "train.train_steps=600", "train.resume=exps/live"], cwd=workdir)
        assert resumed.returncode == 2
        line = error_line(resumed.stderr)
        assert "exps/live" in line and f"process {running.pid}" in line
        assert running.poll() is None  # the first run goes on
        running.send_signal(signal.SIGTERM)
        _, stderr = running.communicate(timeout=120)
        assert running.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert not (workdir / "exps/live" / LOCK_NAME).exists()  # let go on the signal's exit path too
    finally:
        if running.poll() is None:
            os.killpg(running.pid, signal.SIGKILL)
            running.wait()


@pytest.mark.e2e
def test_cli_sigterm_during_setup_releases_the_folder(workdir, demo_args):
    """SIGTERM as soon as the folder is locked (set-up, or at the latest the first steps): exit 143 without a
    traceback, and the lock is gone."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HCP_DEBUG", None)
    proc = subprocess.Popen([sys.executable, *demo_args, "train.train_steps=500", "exp_dir=exps/term",
                             "data.dataset1.cache_latents=true"], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock = workdir / "exps/term" / LOCK_NAME
        deadline = time.time() + 180
        while time.time() < deadline and not lock.exists() and proc.poll() is None:
            time.sleep(0.02)
        assert lock.exists(), "the run never locked its folder"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
        assert "Traceback" not in stderr
        assert not lock.exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
