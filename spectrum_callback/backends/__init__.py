"""Optimizer backends: how a change of the trainable set reaches the optimizer.

One backend per engine.  ``TorchBackend`` covers plain torch optimizers (single
process, DDP); the DeepSpeed ZeRO backend lives in :mod:`.deepspeed_backend`.
"""
from __future__ import annotations

from .base import OptimizerBackend
from .torch_backend import TorchBackend, unwrap_optimizer

__all__ = ["OptimizerBackend", "TorchBackend", "make_backend", "unwrap_optimizer"]


def make_backend(optimizer, model, trainer=None) -> OptimizerBackend:
    """Pick the backend for ``optimizer`` (accelerate's wrapper is looked through)."""
    inner = unwrap_optimizer(optimizer)
    if _is_deepspeed_optimizer(inner):
        from .deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(optimizer, model, trainer)
    return TorchBackend(optimizer, model, trainer)


def _is_deepspeed_optimizer(opt) -> bool:
    mod = type(opt).__module__ or ""
    return mod.startswith("deepspeed.")
