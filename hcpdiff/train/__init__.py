"""Training: the trainer loop, loss, optimizer and scheduler building, experiment folder, logs."""
from hcpdiff.train.run import main, run_training
from hcpdiff.train.trainer import Trainer

__all__ = ["Trainer", "main", "run_training"]
