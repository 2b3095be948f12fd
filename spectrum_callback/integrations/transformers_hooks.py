"""The Trainer's hooks: what must happen before any callback event, handed to the session.

Under DeepSpeed and FSDP2 the Trainer builds the optimizer and loads a checkpoint inside
``train()`` before ``on_train_begin``.  :func:`install_hooks` (from ``SpectrumCallback``'s
constructor) wraps three module-level functions of ``transformers.trainer`` (fenced in
:mod:`spectrum_callback._fence.transformers_internals`); each wrapper finds the running
Trainer, its :class:`~spectrum_callback.SpectrumCallback` and that callback's session, and
calls it:

* ``deepspeed_init``: the session selects and freezes first, so that the optimizer and the
  engine are built over the selection only (on a resume, the checkpoint's saved selection);
  a dynamic ZeRO-1/2 run gets one param group per parameter
  (:func:`~spectrum_callback.backends.deepspeed.split_for_dynamic`);
* ``deepspeed_load_checkpoint``: the ZeRO optimizer is laid out as saved before it loads
  (:func:`~spectrum_callback.backends.deepspeed.lay_out_as_saved`), and the session takes
  that backend over;
* ``load_fsdp_optimizer``: ``requires_grad`` is set as saved, so that torch's template for
  the optimizer state fits the checkpoint (FSDP2).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from .. import _dist, _frozen
from .._fence import transformers_internals as hf
from .._logging import get_logger
from ..backends.optimizers import projected_optim_refusal
from ..state import STATE_FILE, SpectrumState

logger = get_logger(__name__)

__all__ = ["install_hooks", "callback_of"]


def install_hooks() -> None:
    """Wrap the Trainer's module-level functions (idempotent; DeepSpeed's only when it is
    installed)."""
    hf.wrap_fsdp_load_optimizer(_before_fsdp_load)
    if importlib.util.find_spec("deepspeed") is not None:
        hf.wrap_deepspeed_init(_before_deepspeed_init)
        hf.wrap_deepspeed_load_checkpoint(_before_deepspeed_load)


def callback_of(trainer):
    """The one ``SpectrumCallback`` of ``trainer``; ``None`` for none or several (the callback
    refuses several at ``on_train_begin``)."""
    from ..callback import SpectrumCallback

    cbs = [cb for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
           if isinstance(cb, SpectrumCallback)]
    return cbs[0] if len(cbs) == 1 else None


def _running_trainer():
    """``(trainer, its SpectrumCallback, resume_from_checkpoint)`` of the running ``train()``."""
    trainer, resume = hf.find_trainer(lambda t: callback_of(t) is not None)
    return trainer, (callback_of(trainer) if trainer is not None else None), resume


def _before_deepspeed_init(trainer) -> None:
    cb = callback_of(trainer)
    if cb is None:
        return
    why = projected_optim_refusal(getattr(trainer.args, "optim", ""), "deepspeed")
    if why:
        raise ValueError(why)
    _, resume_dir = hf.find_trainer(lambda t: t is trainer)
    state: Optional[SpectrumState] = None
    if resume_dir:
        state = SpectrumState.find([resume_dir])
        if state is None:
            if _dist.is_main():
                logger.warning(
                    "Spectrum: resuming from %s, which has no %s: the optimizer is built over every trainable "
                    "parameter and rebuilt at on_train_begin (start-up peak as full fine-tuning). Resume from a "
                    "checkpoint written with SpectrumCallback to avoid it", resume_dir, STATE_FILE)
            return
    from .._fence.deepspeed_internals import whole
    from ..backends.deepspeed import split_for_dynamic

    device = getattr(trainer.args, "device", None)
    session = cb.session_for(trainer, trainer.model)
    session.preselect(state, lambda units: whole([p for u in units for p in u.params]),
                      device=device if getattr(device, "type", None) == "cuda" else None)
    split_for_dynamic(trainer, cb.config.dynamic, resuming=bool(resume_dir))


def _before_deepspeed_load(engine, checkpoint_path: str) -> None:
    trainer, cb, _ = _running_trainer()
    if cb is None or SpectrumState.find([checkpoint_path]) is None:
        return
    from ..backends.deepspeed import lay_out_as_saved

    backend = lay_out_as_saved(trainer, engine, checkpoint_path)
    if backend is not None:
        cb.session_for(trainer, engine.module)._adopt(backend)


def _before_fsdp_load(fsdp_plugin, model, input_dir: str) -> None:
    if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        return
    state = SpectrumState.find([str(input_dir)])
    if state is None or _running_trainer()[1] is None:
        return
    if state.trainable is None:
        raise ValueError(
            f"{state.source} was written by an older spectrum_callback that did not record the trainable parameters, "
            "which an FSDP2 resume needs; resume from a newer checkpoint or start the run afresh")
    _frozen.restore_trainable(model, state.trainable)
    if _dist.is_main():
        logger.info("Spectrum: FSDP2 resume: %d parameters trainable as saved, before the optimizer state loads",
                    len(state.trainable))
