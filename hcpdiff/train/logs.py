"""Run logging: messages to the terminal and to the experiment's train.log."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_console_logging(level: int = logging.INFO) -> None:
    """Show hcpdiff's info lines on stderr once; library chatter stays at warning level."""
    root = logging.getLogger("hcpdiff")
    if not any(getattr(h, "_hcp_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler._hcp_console = True
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # Per-step lines go to train.log only; the progress bar shows them on the terminal.
    step_logger = logging.getLogger("hcpdiff.train.log")
    step_logger.propagate = False


def setup_run_logging(log_file: Path) -> logging.Handler:
    """Append every hcpdiff message, per-step lines included, to `log_file`."""
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger("hcpdiff").addHandler(handler)
    logging.getLogger("hcpdiff.train.log").addHandler(handler)
    logging.getLogger("hcpdiff.train.log").setLevel(logging.INFO)
    return handler
