"""The training stage (`peftcli train`). The only package that imports TRL."""

from peftcli.training.stage import TrainOutcome, run_training

__all__ = ["TrainOutcome", "run_training"]
