"""SIGTERM during set-up exits 143 even when the library code it interrupted turns the SystemExit into its own error
(omegaconf did: the run printed a ConfigKeyError traceback and exited 1)."""
from __future__ import annotations

import os
import signal

import pytest

import hcpdiff.train.trainer as trainer_module
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
