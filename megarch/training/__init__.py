"""Training: the loop, optimizers and schedules, checkpoints, signals, logging and MFU.

Public API (see each module):

- :class:`Trainer`, :class:`TrainResult`, :class:`NonFiniteError` (loop)
- :func:`build_optimizer`, :func:`lr_at`, :func:`effective_lr` (optim)
- :func:`save_checkpoint`, :func:`find_latest`, :class:`TrainState` (checkpoint: writing);
  :func:`load_checkpoint`, :func:`load_model` (resume: reading, at any layout)
- :class:`MetricsWriter`, :func:`read_metrics`, :func:`setup_logging` (logging)
"""

from megarch.training.checkpoint import TrainState, find_latest, save_checkpoint
from megarch.training.logging import MetricsWriter, read_metrics, setup_logging
from megarch.training.loop import NonFiniteError, Trainer, TrainResult
from megarch.training.optim import build_optimizer, effective_lr, lr_at
from megarch.training.resume import load_checkpoint, load_model

__all__ = [
    "MetricsWriter",
    "NonFiniteError",
    "TrainResult",
    "TrainState",
    "Trainer",
    "build_optimizer",
    "effective_lr",
    "find_latest",
    "load_checkpoint",
    "load_model",
    "lr_at",
    "read_metrics",
    "save_checkpoint",
    "setup_logging",
]
