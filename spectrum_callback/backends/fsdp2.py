"""FSDP2 (torch ``fully_shard``): a torch optimizer over DTensor shards, edited in place.

Public torch API but for one fenced call (checked with torch 2.11 and 2.13):

* FSDP2 keeps each parameter as a DTensor sharded on dim 0 and registers those sharded
  parameters on the modules between forward/backward passes.  ``requires_grad`` is set on
  them; each unshard copies it to the unsharded parameter, and the post-backward
  reduce-scatter only takes parameters that received a gradient, so mixed
  ``requires_grad`` inside one FSDP group is fine.
* A frozen parameter gets ``requires_grad=False`` and ``grad=None``; torch's Adam/AdamW skip
  it, so neither weight decay nor momentum changes a bit of its shard.  A leaver's state is
  deleted (``optimizer.state.pop``), a joiner's is created at its next step: the same
  in-place edit as :class:`~spectrum_callback.backends.torch_backend.TorchBackend`, whose
  code this backend shares; memory follows the selection per rank.
* Under FSDP2 the Trainer builds the optimizer before the model is wrapped and accelerate
  then swaps its parameters for the DTensors; parameters frozen before the Trainer are in no
  param group, and :meth:`prepare` adds them (the lr scheduler's per-group lists don't
  change).
* The SNR scan reads each weight whole on the one rank that computes it
  (:func:`spectrum_callback._sharded.whole_on`: a ``gather`` of the shards to that rank);
  state is counted per rank (``TorchBackend.state_numel`` counts the local shards).
* FSDP2 fixes each group's gradient dtypes at its lazy init from the parameters that then
  require grad; after every switch they are recomputed (a private torch call, fenced in
  :func:`spectrum_callback._fence.torch_internals.refresh_fsdp2_dtypes`), or a group that
  had no trainable parameter would not cast a joiner's bf16 gradient back to fp32.
* Before a scan or a switch the FSDP modules are resharded (``FSDPModule.reshard``), so that
  the parameters the analyzer reads and the session freezes are the sharded ones the
  optimizer holds (an evaluation with ``reshard_after_forward=False`` leaves them unsharded).

Resume: the Trainer's FSDP2 checkpoint (accelerate's ``load_fsdp_optimizer``, DCP) builds the
optimizer state it loads into from the parameters that require grad; the Trainer hook
(:mod:`spectrum_callback.integrations.transformers_hooks`) sets ``requires_grad`` as saved
first, so that the saved state of the selection fits.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Dict, List, Sequence

from torch import nn

from .._fence.torch_internals import refresh_fsdp2_dtypes
from .base import SwitchResult
from .optimizers import engine_refusal
from .torch_backend import TorchBackend


def fsdp2_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (none without FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class FSDP2Backend(TorchBackend):
    """Spectrum's backend for models sharded by FSDP2 (see the module doc)."""

    name = "fsdp2"

    def __init__(self, optimizer, model: nn.Module, trainer=None, lr_scheduler=None):
        super().__init__(optimizer, model, trainer, lr_scheduler)
        why = engine_refusal(self.opt, "fsdp2")
        if why:
            raise ValueError(why)
        self.fsdp_modules = fsdp2_modules(model)

    def _reshard(self) -> None:
        for m in self.fsdp_modules:
            m.reshard()

    def gather(self, modules) -> ContextManager:
        # The weights are read by _sharded.whole_on (shards to their owner); only make sure they
        # are the sharded parameters.
        self._reshard()
        return contextlib.nullcontext()

    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool, park_state: bool = False) -> None:
        self._reshard()
        super().prepare(candidates, dynamic, park_state)

    def sync_selection(self, obj):
        self._reshard()  # the session sets requires_grad next: on the sharded parameters
        return super().sync_selection(obj)

    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> SwitchResult:
        result = super().switch(leaving, joining)
        # A group FSDP2 initialised with no trainable parameter has no gradient dtypes; under
        # mixed precision a joiner's bf16 gradient would not be cast back to its fp32 shard.
        refresh_fsdp2_dtypes(self.fsdp_modules)
        return result
