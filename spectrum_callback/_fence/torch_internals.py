"""torch internals (checked with torch 2.11 and 2.13): Adam's step dtype, an lr scheduler's
last lr, FSDP1's mark on its flat parameters, and FSDP2's per-group gradient dtypes."""
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


def refresh_fsdp2_dtypes(modules) -> None:
    """Recompute each FSDP2 parameter group's gradient dtypes from the parameters that require
    grad now (``FSDPParamGroup._init_mp_dtypes``).

    FSDP2 computes a group's original and reduce dtypes once, at its lazy init, from the
    parameters that then require grad; a group with none gets ``None`` for both.  When one of
    its parameters starts training later under mixed precision, the bf16 reduced gradient is
    then never cast back to the fp32 parameter and the backward fails ("attempting to assign
    a gradient with dtype BFloat16 to a tensor with grad_dtype Float").  Called after every
    change of the trainable set; a no-op for groups whose dtypes do not change."""
    for m in modules:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        if group is not None:
            group._init_mp_dtypes()
