"""Plain torch optimizers (single process and DDP).

* A frozen parameter gets ``requires_grad=False`` and ``grad=None``; torch's Adam/AdamW
  (for-loop, foreach and fused) skip parameters without a gradient, so weight decay
  and momentum never touch it: its bits stay as they are.
* A parameter that leaves the selection loses its optimizer state (``state.pop``), so
  its moments are freed; one that joins starts with fresh state, created lazily by
  the optimizer at its next step.
* Every candidate must be in a param group (dynamic mode needs them all from the
  start); the Trainer builds its optimizer from ``requires_grad=True`` parameters, so
  a candidate missing there is added to the param group that matches its decay class.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn

from .._params import decay_and_no_decay, decays, local_numel
from .base import OptimizerBackend, SwitchResult
from .._logging import get_logger

logger = get_logger(__name__)


def unwrap_optimizer(optimizer):
    """Look through accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 4 and type(optimizer).__name__ in (
        "AcceleratedOptimizer",
        "DeepSpeedOptimizerWrapper",
        "LayerWiseDummyOptimizer",
    ):
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class TorchBackend(OptimizerBackend):
    name = "torch"

    def __init__(self, optimizer, model: nn.Module, trainer=None, lr_scheduler=None):
        super().__init__(optimizer, model, trainer, lr_scheduler)
        if optimizer is None:
            raise ValueError(
                "Spectrum got no optimizer: pass it to SpectrumSession(model, optimizer, ...), use SpectrumCallback "
                "with transformers.Trainer, or call spectrum_freeze(model, ...) before building your own optimizer"
            )
        self.opt = unwrap_optimizer(optimizer)
        if not isinstance(self.opt, torch.optim.Optimizer):
            raise ValueError(
                f"unsupported optimizer type {type(self.opt).__name__}: Spectrum needs a torch.optim.Optimizer "
                "(or DeepSpeed ZeRO); for others, freeze before training with spectrum_freeze(model, ...)"
            )

    def _members(self) -> Dict[int, int]:
        return {id(p): gi for gi, g in enumerate(self.opt.param_groups) for p in g["params"]}

    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool) -> None:
        # Candidates the optimizer was built without (spectrum_freeze froze them before the
        # Trainer) join the param group of their decay class, so that any can be selected.
        # Parameters the user froze are no candidates (the session leaves them out).
        members = self._members()
        missing = [(n, p) for n, ps in candidates.items() for p in ps if id(p) not in members]
        if not missing:
            return
        decay_group, no_decay_group = self._decay_groups()
        for name, p in missing:
            group = decay_group if decays(p) else no_decay_group
            self.opt.param_groups[group]["params"].append(p)
        logger.info(
            "Spectrum: added %d parameters that were frozen when the optimizer was built to its param groups",
            len(missing),
        )

    def _decay_groups(self):
        decay, no_decay = decay_and_no_decay([g.get("weight_decay", 0.0) for g in self.opt.param_groups])
        return decay, (decay if no_decay is None else no_decay)

    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> SwitchResult:
        for p in leaving:
            p.grad = None
            self.opt.state.pop(p, None)
        for p in joining:
            # Fresh state: whatever the optimizer held (e.g. restored from an old checkpoint) goes.
            self.opt.state.pop(p, None)
        return SwitchResult()  # edited in place: no storage moved

    def state_numel(self) -> int:
        total = 0
        for st in self.opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.ndim > 0:
                    total += local_numel(v)  # this rank's shard of a DTensor (FSDP2)
        return total
