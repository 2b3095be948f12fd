"""Small facts about parameters that the session, the backends and the analyzer all need.

* :func:`unique_params` / :func:`param_names`: each parameter once, in model order (a tied
  weight has several names; the first one names it);
* :func:`local_view`, :func:`local_numel`, :func:`full_shape`, :func:`full_numel`: what this
  rank holds of a plain, ZeRO-3 or DTensor (FSDP2) parameter, and the whole one's size;
* :func:`decay_and_no_decay`: which of an optimizer's groups a parameter that joins later
  goes to, by weight decay (matrices decay, biases and norms do not, as in the Trainer).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._fence.deepspeed_internals import full_ndim, full_numel, full_shape, local_tensor
from ._sharded import local_part

__all__ = ["unique_params", "param_names", "local_view", "local_numel", "full_shape", "full_numel", "full_ndim",
           "decays", "decay_and_no_decay"]


def unique_params(model: nn.Module) -> List[nn.Parameter]:
    """Every parameter of ``model`` once, in model order."""
    out, seen = [], set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def param_names(model: nn.Module) -> Dict[int, str]:
    """``id(p)`` -> the first name of ``p`` in ``model`` (tied weights have several)."""
    out: Dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


def local_view(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 partition, its DTensor shard, or ``p``."""
    return local_part(local_tensor(p))


def local_numel(p: torch.Tensor) -> int:
    return local_view(p).numel()


def decays(p: torch.Tensor) -> bool:
    """Whether ``p`` belongs with the weight-decay parameters (a matrix or bank, not a bias
    or a norm): the rule the backends use for a parameter no optimizer group held yet."""
    return full_ndim(p) >= 2


def decay_and_no_decay(weight_decays: Sequence[float]) -> Tuple[int, Optional[int]]:
    """Indices of the group with the largest weight decay (the first of equals) and of the
    first group without weight decay (``None`` when every group decays)."""
    wds = list(weight_decays)
    decay = max(range(len(wds)), key=lambda i: (wds[i], -i))
    zero = [i for i, w in enumerate(wds) if w == 0.0]
    return decay, (zero[0] if zero else None)
