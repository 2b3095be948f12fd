"""What a rebuild of the ZeRO optimizer does differently per stage: the interface.

:class:`~.backend.DeepSpeedBackend` runs the same rebuild at every stage (its module doc,
steps 1-5) and picks one :class:`ZeroStage` when it is built: :class:`.stage12.Stage12`
(flat partitions of param groups) or :class:`.stage3.Stage3` (each parameter partitioned
on its own).  A ``ZeroStage`` holds no state: the optimizer and engine are passed in.
"""
from __future__ import annotations

import abc
from typing import ContextManager, Dict, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

# A group whose state moves into the new optimizer as it is: (old Adam state, old fp32
# master partition, or None where the new optimizer builds its master from fp32 weights).
Reused = Tuple[dict, Optional[torch.Tensor]]


class ZeroStage(abc.ABC):
    """The per-stage steps of a rebuild."""

    @abc.abstractmethod
    def gather(self, modules: Sequence[nn.Module]) -> ContextManager:
        """A context in which the weights of ``modules`` are whole on this rank (a scan)."""

    @abc.abstractmethod
    def reusable(self, zero, old_groups, new_params: Sequence[nn.Parameter], force_fresh: Set[int],
                 keys: List[str]) -> Dict[tuple, Reused]:
        """The old groups of ``zero`` (``old_groups``, as ``ds.param_groups``) that come back
        unchanged and keep their state in place: ``{tuple of id(p): Reused}``.  Their
        parameters are not copied (:meth:`copy_local`)."""

    @abc.abstractmethod
    def link_state(self, zero, keys: List[str]) -> None:
        """Before the stayers are copied from ``zero``: make what :meth:`copy_local` reads
        point at ``zero``'s current state tensors (Adam state ``keys``)."""

    @abc.abstractmethod
    def copy_local(self, p: nn.Parameter, key: Optional[str], dev: torch.device):
        """A copy on ``dev`` of what this rank holds of ``p``'s fp32 master (``key=None``) or
        Adam state ``key``; ``None`` where it holds nothing."""

    @abc.abstractmethod
    def write_local(self, p: nn.Parameter, key: Optional[str], value) -> None:
        """Write a :meth:`copy_local` copy into the new optimizer.  Every rank calls it for the
        same parameters and keys in the same order (it may be collective)."""

    @abc.abstractmethod
    def groups(self, entries: List[Tuple[int, int, nn.Parameter]]) -> List[Tuple[int, int, List[nn.Parameter]]]:
        """The new torch param groups ``[(class, Adam step, params)]`` from every trainable
        parameter's ``(class, Adam step, p)`` in model order."""

    @abc.abstractmethod
    def configure(self, engine, base, reuse: Dict[tuple, Reused]) -> Tuple[object, int]:
        """Let ``engine`` wrap the torch optimizer ``base`` (as ``deepspeed.initialize``
        did) and move the reused fp32 masters into it.  Returns the new ZeRO optimizer and
        how many masters were copied only after it was built."""
