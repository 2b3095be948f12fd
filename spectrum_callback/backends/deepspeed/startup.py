"""Start-up under DeepSpeed: select before the optimizer exists.

The Trainer builds its optimizer, and DeepSpeed its ZeRO optimizer with an fp32 master
partition of every parameter that requires grad, inside ``train()`` and before any callback
event (``Trainer._prepare_for_training`` -> ``deepspeed_init``).  A ``SpectrumCallback``
that selected only at ``on_train_begin`` therefore made the start-up peak that of full
fine-tuning.  :func:`install_startup_hook` (from the callback's constructor, when DeepSpeed
is installed) wraps ``transformers.trainer.deepspeed_init`` (fenced in
:mod:`spectrum_callback._fence.transformers_internals`): when the running Trainer holds a
``SpectrumCallback``, the callback selects and freezes first
(:meth:`~spectrum_callback.SpectrumCallback.select_before_optimizer`), so the optimizer and
the engine are built over the selection only.  Matrices that join later come in through the
backend's rebuilds.  Where this cannot happen (the callback was added after ``train()``
began, a resume from a checkpoint written without Spectrum), the backend's first switch
rebuilds from the full optimizer and says so once (:mod:`.backend`).
"""
from __future__ import annotations

from ..._fence.transformers_internals import find_trainer, spectrum_callbacks, wrap_deepspeed_init
from ..._logging import get_logger

logger = get_logger(__name__)


def _before_init(trainer) -> None:
    cbs = spectrum_callbacks(trainer)
    if len(cbs) != 1:  # none, or several (refused at on_train_begin)
        return
    cb = cbs[0]
    _, resume_dir = find_trainer(lambda t: t is trainer)
    cb.select_before_optimizer(trainer, resume_dir)


def install_startup_hook() -> bool:
    """Wrap ``transformers.trainer.deepspeed_init`` (idempotent)."""
    return wrap_deepspeed_init(_before_init)
