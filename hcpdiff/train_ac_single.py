"""Train on one process: `accelerate launch -m hcpdiff.train_ac_single --cfg F [overrides]` (or plain python -m)."""
import os

from hcpdiff.cli import run_cli
from hcpdiff.errors import ConfigError
from hcpdiff.train.run import main

SEVERAL_PROCESSES = "hcpdiff.train_ac_single runs one process; launch hcpdiff.train_ac for several"


def cli(argv: list[str]) -> int:
    """One-process training entry point."""
    # torchrun and accelerate launch tell each worker the world size: refuse before torch loads, not after
    # every worker has imported it (the Trainer checks again with accelerate's own count).
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ConfigError(SEVERAL_PROCESSES)
    return main(argv, prog="python -m hcpdiff.train_ac_single", single_process=True)


if __name__ == "__main__":
    run_cli(cli)
