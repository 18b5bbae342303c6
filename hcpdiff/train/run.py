"""Entry-point body shared by `hcpdiff.train_ac_single` and `hcpdiff.train_ac`."""
from __future__ import annotations

import gc
import logging
import os
import signal
import warnings
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

from hcpdiff.cli import cfg_parser
from hcpdiff.config.v1_compat import MIGRATE_HINT, load_maybe_v1
from hcpdiff.errors import ConfigError
from hcpdiff.train.logs import setup_console_logging


def quiet_libraries() -> None:
    """Keep library banners and deprecation chatter off the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - both are dependencies
        pass


def run_training(cfg, *, single_process: bool) -> str:
    """Set up and run one training from a resolved config; returns the experiment folder."""
    from hcpdiff.train.trainer import Trainer

    from hcpdiff.train.signals import TrainingInterrupted

    with imports_frozen():  # imported now: torch, diffusers, transformers, peft, accelerate
        trainer = Trainer(cfg, single_process=single_process)
        terminated: list[int] = []
        try:
            with terminate_unwinds(terminated):
                trainer.setup()
            trainer.train()  # handles SIGINT / SIGTERM itself: it saves a checkpoint first
        except TrainingInterrupted:
            trainer.cleanup()  # stopped on purpose, with a checkpoint written
            raise
        except BaseException:
            try:
                trainer.cleanup(failed=True)
            except Exception as err:  # noqa: BLE001 - the error that stopped the run is the one to report
                # one line: a set-up cut short (SIGTERM, an error) leaves parts cleanup cannot close;
                # HCP_DEBUG=1 shows where
                logging.getLogger("hcpdiff.train").warning("cleanup after the failure did not finish: %r", err,
                                                           exc_info=os.environ.get("HCP_DEBUG", "") not in ("", "0"))
            if terminated:  # the SIGTERM's exit, even where library code it interrupted turned it into another error
                raise SystemExit(128 + terminated[0]) from None
            raise
        trainer.cleanup()
        return str(trainer.exp_dir)


@contextmanager
def imports_frozen() -> Iterator[None]:
    """While active, the objects alive before it (the imported libraries' ~500k modules, classes and functions) are
    left out of garbage collection: none of them is the run's garbage, yet each full collection the run makes when it
    releases its text encoders and models (three a run, accelerate's free_memory included) would walk them all, ~0.8 s
    each on a CPU. What the run makes (its models) is collected as before, and afterwards everything is again (a
    caller that trains in its own process: the tests, a notebook)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def terminate_unwinds(terminated: list[int]) -> Iterator[None]:
    """While active, SIGTERM exits through Python (status 143) instead of killing the process outright, so the
    folder's lock and the process group are released on that path too. The signal is also noted in `terminated`:
    raised inside a library (omegaconf, say), the SystemExit may surface as that library's own error."""
    def terminate(signum: int, frame: FrameType | None) -> None:
        terminated.append(signum)
        raise SystemExit(128 + signum)

    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread: signals are the caller's
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit(err) -> int:
    """Tell the user how to continue an interrupted run; returns the exit status."""
    logging.getLogger("hcpdiff.train").warning(
        "stopped by %s at step %d; checkpoint and state saved. Continue with: train.resume=%s",
        err.args[0].split()[0], err.step, err.exp_dir)
    return err.exit_code


V1_READ = "%s is an HCP-Diffusion v1 config, read as today's: %s. `%s` writes it in today's spelling."
SEVERAL_PROCESSES = "hcpdiff.train_ac_single runs one process; launch hcpdiff.train_ac for several"


def main(argv: list[str], *, prog: str, single_process: bool) -> int:
    """Parse `--cfg FILE [overrides]`, load the config and train."""
    args = cfg_parser(prog, "Train LoRA adapters for a text-to-image diffusion model.").parse_args(argv)
    # torchrun and accelerate launch tell each worker the world size: refuse before torch loads, not after every
    # worker has imported it (the Trainer checks again with accelerate's own count)
    if single_process and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError(SEVERAL_PROCESSES)
    quiet_libraries()
    setup_console_logging()
    from hcpdiff.families import TRAINABLE_PARTS
    from hcpdiff.train.specs import top_level_keys

    cfg, v1 = load_maybe_v1(args.cfg, args.overrides, kind="train", top_level=top_level_keys(TRAINABLE_PARTS))
    if v1 is not None:
        logging.getLogger("hcpdiff.train").warning(V1_READ, args.cfg, v1.summary(), MIGRATE_HINT)
    from hcpdiff.train.signals import TrainingInterrupted

    try:
        run_training(cfg, single_process=single_process)
    except TrainingInterrupted as err:
        return interrupted_exit(err)
    return 0
