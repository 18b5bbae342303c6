"""SIGINT / SIGTERM during training: finish the optimizer step, save a resumable checkpoint, exit cleanly."""
from __future__ import annotations

import signal
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint at `step`."""

    def __init__(self, signum: int, step: int, exp_dir: str):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.exp_dir = signum, step, exp_dir

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + self.signum


class StopSignals:
    """While active, the first SIGINT / SIGTERM is remembered (`requested`); a second one stops at once."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        for signum in HANDLED:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
