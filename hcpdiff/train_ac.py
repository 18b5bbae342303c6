"""Train on one or more processes: `accelerate launch [--multi_gpu ...] -m hcpdiff.train_ac --cfg F [overrides]`."""
from hcpdiff.cli import run_cli
from hcpdiff.train.run import main


def cli(argv: list[str]) -> int:
    """Multi-process training entry point (accelerate / torchrun provide the processes)."""
    return main(argv, prog="python -m hcpdiff.train_ac", single_process=False)


if __name__ == "__main__":
    run_cli(cli)
