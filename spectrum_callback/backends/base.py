from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn


class OptimizerBackend:
    """What the callback needs from an engine.

    ``prepare`` runs once at ``on_train_begin``; ``switch`` runs at ``on_step_begin``
    (between optimizer steps) after ``requires_grad`` was updated, with the
    parameters that left and joined the trainable set.
    """

    name = "base"

    def __init__(self, optimizer, model: nn.Module, trainer=None):
        self.optimizer = optimizer
        self.model = model
        self.trainer = trainer

    def attach_analyzer(self, analyzer) -> None:
        """Give the engine a say in how the analyzer reads weights (ZeRO-3 gathers shards)."""

    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool) -> None:
        raise NotImplementedError

    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> None:
        raise NotImplementedError

    def state_numel(self) -> int:
        """Elements held in optimizer state on this rank (Adam moments, master copies)."""
        raise NotImplementedError

    def sync_selection(self, obj):
        """Make ``obj`` identical on all ranks (rank 0's copy wins)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            return box[0]
        return obj
