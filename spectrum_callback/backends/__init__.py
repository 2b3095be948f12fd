"""Optimizer backends: how a change of the trainable set reaches the optimizer.

One backend per engine, behind :class:`~spectrum_callback.backends.base.OptimizerBackend`:
:class:`TorchBackend` (plain torch optimizers, one process or DDP),
:class:`FSDP2Backend` (torch ``fully_shard``: a torch optimizer over DTensor shards) and
:class:`~spectrum_callback.backends.deepspeed.DeepSpeedBackend` (ZeRO-1/2/3, imported only
when a ZeRO optimizer is in use).
"""
from __future__ import annotations

from .._fence.deepspeed_internals import is_zero_optimizer
from .base import OptimizerBackend, SwitchResult
from .fsdp2 import FSDP2Backend, fsdp2_modules
from .torch_backend import TorchBackend, unwrap_optimizer

__all__ = ["FSDP2Backend", "OptimizerBackend", "SwitchResult", "TorchBackend", "make_backend", "unwrap_optimizer"]


def make_backend(optimizer, model, trainer=None, lr_scheduler=None, prepared=None) -> OptimizerBackend:
    """The backend for ``optimizer`` (accelerate's wrapper is looked through).  ``prepared``:
    a backend a resume hook already built for it (DeepSpeed lays its optimizer out as saved
    before the checkpoint loads), taken over when it serves this optimizer."""
    if is_zero_optimizer(unwrap_optimizer(optimizer)):
        from .deepspeed import DeepSpeedBackend, rebind

        if prepared is not None and rebind(prepared, optimizer, trainer, lr_scheduler):
            return prepared
        return DeepSpeedBackend(optimizer, model, trainer, lr_scheduler)
    if fsdp2_modules(model):
        return FSDP2Backend(optimizer, model, trainer, lr_scheduler)
    return TorchBackend(optimizer, model, trainer, lr_scheduler)
