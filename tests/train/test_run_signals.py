"""SIGTERM during set-up exits 143 even when the library code it interrupted turns the SystemExit into its own error
(omegaconf did: the run printed a ConfigKeyError traceback and exited 1)."""
from __future__ import annotations

import os
import signal

import pytest

import hcpdiff.train.trainer as trainer_module
from hcpdiff.train.exp_dir import LOCK_NAME, lock_exp_dir
from hcpdiff.train.run import run_training


class InterruptedSetup:
    """A Trainer whose set-up is interrupted by SIGTERM inside code that re-raises what it caught as a ValueError."""

    cleaned: list[bool] = []

    def __init__(self, cfg, *, single_process):
        pass

    def setup(self):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except SystemExit as exit_:  # what a library's `except BaseException: raise ...` does
            raise ValueError("'NoneType' object has no attribute '_invalidate_flags_cache'") from exit_

    def cleanup(self, failed=False):
        self.cleaned.append(failed)


def test_sigterm_inside_library_code_still_exits_143(monkeypatch):
    monkeypatch.setattr(trainer_module, "Trainer", InterruptedSetup)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        run_training({}, single_process=True)
    assert info.value.code == 128 + signal.SIGTERM
    assert InterruptedSetup.cleaned == [True]  # the folder's lock and process group were let go
    assert signal.getsignal(signal.SIGTERM) is previous


class HalfBuiltTracker:
    """A tracker a SIGTERM interrupted in construction: finishing it fails as accelerate's did ('writer')."""

    def finish(self):
        raise AttributeError("'TensorBoardTracker' object has no attribute 'writer'")


def test_cleanup_lets_go_of_the_folder_when_an_earlier_release_fails(tmp_path):
    """A set-up cut short leaves parts that cannot be closed; the folder's lock is released all the same (CI saw
    a lock left behind when the tracker's finish raised first), and the error is still raised."""
    exp_dir = tmp_path / "exps/run"
    exp_dir.mkdir(parents=True)
    trainer = object.__new__(trainer_module.Trainer)
    trainer.exp_lock = lock_exp_dir(exp_dir)
    trainer.created_exp_dir, trainer.training_started = True, False
    trainer.tracker = HalfBuiltTracker()
    with pytest.raises(AttributeError, match="writer"):
        trainer.cleanup(failed=True)
    assert not (exp_dir / LOCK_NAME).exists()
    assert not exp_dir.exists()  # a failed set-up with no outputs leaves no folder
