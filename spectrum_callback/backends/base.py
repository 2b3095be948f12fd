"""The interface between :class:`~spectrum_callback.SpectrumSession` and an engine's optimizer.

One backend per engine: :class:`~spectrum_callback.backends.torch_backend.TorchBackend`
(plain torch optimizers, one process or DDP),
:class:`~spectrum_callback.backends.fsdp2.FSDP2Backend` (a torch optimizer over FSDP2's
DTensor shards) and :class:`~spectrum_callback.backends.deepspeed.DeepSpeedBackend`
(ZeRO-1/2/3).  A new engine plugs in by subclassing :class:`OptimizerBackend` and adding a
branch to :func:`~spectrum_callback.backends.make_backend`; the analyzer and the session stay
as they are.

The session drives a backend in this order, always between optimizer steps:

1. construction with the optimizer, the model, the Trainer (``None`` in a custom loop) and
   the lr scheduler;
2. :meth:`~OptimizerBackend.gather` is handed to the analyzer: how to read whole weight
   matrices (sharded engines gather them, collectively);
3. :meth:`~OptimizerBackend.prepare` once, with every candidate matrix's parameters;
4. :meth:`~OptimizerBackend.sync_selection` at every selection, so that all ranks agree;
5. :meth:`~OptimizerBackend.switch` after ``requires_grad`` was set for the new selection;
   the :class:`SwitchResult` says which parameters' storage moved, so that the session can
   tell the analyzer (the values did not change);
6. :meth:`~OptimizerBackend.state_numel` for the metrics.
"""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from typing import ContextManager, Dict, List, Sequence, Set

from torch import nn

from .. import _dist


@dataclass
class SwitchResult:
    """What a switch did.

    Attributes:
        moved: ``id()`` of the parameters whose storage moved with unchanged values (an
            engine re-flattened its buffers); the analyzer re-keys its cached SNRs of those
            matrices.  Empty when the optimizer was edited in place.
    """

    moved: Set[int] = field(default_factory=set)


class OptimizerBackend(abc.ABC):
    """How a change of the trainable set reaches one engine's optimizer.

    Args:
        optimizer: the run's optimizer (accelerate's wrapper included).
        model: the model (unwrapped).
        trainer: the running ``transformers.Trainer`` (``None`` in a custom loop, or if it
            could not be found).
        lr_scheduler: the lr scheduler (``None`` if none).
    """

    name = "base"

    def __init__(self, optimizer, model: nn.Module, trainer=None, lr_scheduler=None):
        self.optimizer = optimizer
        self.model = model
        self.trainer = trainer
        self.lr_scheduler = lr_scheduler

    def gather(self, modules: Sequence[nn.Module]) -> ContextManager:
        """A context in which the weights of ``modules`` are whole on this rank.

        Called by the analyzer around each chunk of a scan, in the same order on every rank
        (a sharded engine's gather is collective).  The default does nothing: the weights
        are whole already.

        Args:
            modules: the candidate modules of one chunk (their ``weight`` is read).

        Returns:
            A context manager; the weights are whole inside it.
        """
        return contextlib.nullcontext()

    @abc.abstractmethod
    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool, park_state: bool = False) -> None:
        """Get ready to train any of ``candidates``.

        Called once, before the first selection.  In dynamic mode every candidate may join
        later, so the engine must be able to train each (the torch backend adds candidates
        the optimizer was built without to a param group).  Static mode may refuse
        candidates that could never train.

        Args:
            candidates: module name -> that module's parameters, for every candidate.
            dynamic: whether the selection will change during training.
            park_state: a leaver's optimizer state waits in host memory (:meth:`switch`)
                and comes back when it rejoins, instead of being dropped.

        Raises:
            ValueError: a candidate can never be trained by this engine, or it cannot park.
        """

    @abc.abstractmethod
    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> SwitchResult:
        """Make the optimizer follow the new trainable set.

        Called between optimizer steps only, on every rank with the same arguments, after
        ``requires_grad`` was set on every parameter for the new selection.

        Args:
            leaving: parameters that stop training.  Afterwards they have no optimizer state
                on the device (parked in host memory with ``park_state``) and no gradient,
                and no optimizer step can change a bit of them.
            joining: parameters that start training; they get fresh state, or their parked
                state back.  Parameters in neither list that train keep their state exactly.

        Returns:
            What moved (see :class:`SwitchResult`).
        """

    @abc.abstractmethod
    def state_numel(self) -> int:
        """Elements of optimizer state on this rank.

        Returns:
            The moments' elements, plus the master copies where the engine keeps them.
        """

    def parked_bytes(self) -> int:
        """Bytes of optimizer state parked in host memory on this rank."""
        return 0

    def parked_state(self) -> Dict[str, object]:
        """The parked state, by parameter name (this rank's part), for a checkpoint."""
        return {}

    def load_parked(self, parked: Dict[str, object]) -> None:
        """Parked state from :meth:`parked_state` of a checkpoint (a resume)."""
        if parked:
            raise ValueError(f"the {self.name} backend cannot take parked optimizer state")

    def sync_selection(self, obj):
        """Make every rank select alike.

        Args:
            obj: the selection and its SNRs, as this rank computed them.

        Returns:
            Rank 0's ``obj``, on every rank (collective).
        """
        return _dist.broadcast_from_main(obj)
