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

from .._params import decay_and_no_decay, decays, local_numel, param_names
from .._fence.torch_internals import adam_step_tensor
from .._sharded import Parked, is_dtensor
from .._sharded import local_part as local_part_of
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
        self.park_state = False
        self.parked: Dict[int, Dict[str, object]] = {}  # id(p) -> its optimizer state in host memory

    def _members(self) -> Dict[int, int]:
        return {id(p): gi for gi, g in enumerate(self.opt.param_groups) for p in g["params"]}

    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool, park_state: bool = False) -> None:
        self.park_state = park_state
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
            state = self.opt.state.pop(p, None)
            if self.park_state and state:
                self.parked[id(p)] = {k: Parked(v) if torch.is_tensor(v) else v for k, v in state.items()}
        for p in joining:
            # Fresh state (whatever the optimizer held, e.g. from an old checkpoint, goes), or
            # the parked state of a matrix that comes back.
            self.opt.state.pop(p, None)
            back = self.parked.pop(id(p), None)
            if back is not None:
                self.opt.state[p] = {k: v.restore() if isinstance(v, Parked) else v for k, v in back.items()}
        return SwitchResult()  # edited in place: no storage moved

    def parked_bytes(self) -> int:
        return sum(v.nbytes for st in self.parked.values() for v in st.values() if isinstance(v, Parked))

    def parked_state(self) -> Dict[str, object]:
        names = param_names(self.model)
        return {names[i]: {k: v.local if isinstance(v, Parked) else v for k, v in st.items()}
                for i, st in self.parked.items()}

    def load_parked(self, parked: Dict[str, object]) -> None:
        by_name = dict(self.model.named_parameters(remove_duplicate=False))
        groups = self._members()
        for name, st in parked.items():
            p = by_name[name]
            group = self.opt.param_groups[groups[id(p)]]
            self.parked[id(p)] = {
                k: (adam_step_tensor(int(v), group, local_part_of(p)) if k == "step" and torch.is_tensor(v)
                    else _parked_like(v, p) if torch.is_tensor(v) else v)
                for k, v in st.items()}

    def state_numel(self) -> int:
        total = 0
        for st in self.opt.state.values():
            for v in st.values():
                if torch.is_tensor(v) and v.ndim > 0:
                    total += local_numel(v)  # this rank's shard of a DTensor (FSDP2)
        return total


def _parked_like(local: torch.Tensor, p: nn.Parameter) -> Parked:
    """A checkpoint's parked moment of ``p`` (this rank's part), to go back beside ``p``: a
    DTensor shard laid out as ``p`` is, or a tensor on ``p``'s device."""
    parked = Parked.__new__(Parked)
    parked.local = local.to("cpu")
    parked.device = local_part_of(p).device
    parked.spec = (p.device_mesh, p.placements, p.shape, p.stride()) if is_dtensor(p) else None
    return parked
