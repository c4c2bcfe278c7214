"""The SimMIM recipes on `transformers.Trainer`: arguments, parameter groups, schedules, trainers, callbacks,
fine-tuning and frozen-encoder probing."""

from .schedules import SimMIMLRLambda, SimMIMRecipe, get_simmim_scheduler
from .trainer import NonFiniteLossError, SimMIMFineTuneTrainer, SimMIMTrainer

__all__ = [
    "NonFiniteLossError",
    "SimMIMFineTuneTrainer",
    "SimMIMLRLambda",
    "SimMIMRecipe",
    "SimMIMTrainer",
    "get_simmim_scheduler",
]
