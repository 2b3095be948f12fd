"""torch internals (checked with torch 2.11 and 2.13)."""
from __future__ import annotations

from typing import Sequence

import torch


def adam_step_tensor(step: int, group: dict, like: torch.Tensor) -> torch.Tensor:
    """Adam's ``state["step"]`` as torch's own Adam/AdamW create it: a scalar of
    ``torch.optim.optimizer._get_scalar_dtype()``, on the parameter's device for fused or
    capturable groups and on the CPU otherwise."""
    from torch.optim.optimizer import _get_scalar_dtype

    dev = like.device if (group.get("fused") or group.get("capturable")) else torch.device("cpu")
    return torch.tensor(float(step), dtype=_get_scalar_dtype(), device=dev)


def set_scheduler_last_lr(scheduler, lrs: Sequence[float]) -> None:
    """``LRScheduler._last_lr``: what ``get_last_lr()`` (and the Trainer's logged lr) returns."""
    scheduler._last_lr = list(lrs)


def is_fsdp1_flattened(p: torch.Tensor) -> bool:
    """FSDP1 marks the parameters it flattened (``_fsdp_flattened``); the inner module of a
    root-only wrap holds no FSDP object, so this mark is how to tell."""
    return bool(getattr(p, "_fsdp_flattened", False))
