"""Train on one process: `accelerate launch -m hcpdiff.train_ac_single --cfg F [overrides]` (or plain python -m)."""
from hcpdiff.cli import run_cli
from hcpdiff.train.run import main


def cli(argv: list[str]) -> int:
    """One-process training entry point."""
    return main(argv, prog="python -m hcpdiff.train_ac_single", single_process=True)


if __name__ == "__main__":
    run_cli(cli)
