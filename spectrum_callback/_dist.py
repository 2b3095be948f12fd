"""Rank and world size of ``torch.distributed`` (1 process when it is not initialized)."""
from __future__ import annotations

import torch


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main() -> bool:
    return rank() == 0


def broadcast_from_main(obj):
    """``obj`` as rank 0 has it, on every rank (identity in one process)."""
    if world() > 1:
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]
    return obj
