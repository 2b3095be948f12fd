"""The Trainer's hooks: what must happen before any callback event, handed to the session.

Under DeepSpeed and FSDP2 the Trainer builds the optimizer and loads a checkpoint inside
``train()`` before ``on_train_begin``.  :func:`install_hooks` (called by ``SpectrumCallback``'s
constructor) wraps three module-level functions of ``transformers.trainer`` (fenced in
:mod:`spectrum_callback._fence.transformers_internals`).  Each wrapper reaches the
:class:`~spectrum_callback.SpectrumSession` through the model it drives
(:meth:`~spectrum_callback.SpectrumSession.of`) or, before the session exists, through the
``session_of_trainer`` function the callback registered, with the Trainer taken from the
hooked function's arguments (``deepspeed_init``) or, where transformers passes none, from the
call stack:

* ``deepspeed_init(trainer, ...)``: the session preselects and freezes first, so that the
  optimizer and the engine are built over the selection only (on a resume, the checkpoint's
  saved selection); a dynamic ZeRO-1/2 run gets one param group per parameter
  (:func:`~spectrum_callback.backends.deepspeed.split_for_dynamic`);
* ``deepspeed_load_checkpoint(engine, path)``: the ZeRO optimizer is laid out as saved before
  it loads (:func:`~spectrum_callback.backends.deepspeed.lay_out_as_saved`), and the session
  adopts that backend;
* ``load_fsdp_optimizer(plugin, accelerator, optimizer, model, path)``: ``requires_grad`` is set
  as saved, so that torch's template for the optimizer state fits the checkpoint (FSDP2).
"""
from __future__ import annotations

import importlib.util
from typing import Callable, Optional

from .. import _dist, _frozen
from .._fence import transformers_internals as hf
from .._fence.deepspeed_internals import whole
from .._logging import get_logger
from ..backends.deepspeed import lay_out_as_saved, split_for_dynamic
from ..backends.optimizers import projected_optim_refusal
from ..session import SpectrumSession
from ..state import STATE_FILE, SpectrumState

logger = get_logger(__name__)

__all__ = ["install_hooks"]

# trainer -> the session of its SpectrumCallback (None without one); set by install_hooks
_session_of_trainer: Optional[Callable[[object], Optional[SpectrumSession]]] = None


def install_hooks(session_of_trainer: Callable[[object], Optional[SpectrumSession]]) -> None:
    """Wrap the Trainer's module-level functions (idempotent; DeepSpeed's only when it is
    installed).  ``session_of_trainer(trainer)`` gives the session of the Trainer's
    SpectrumCallback, made if it has none yet, or ``None`` when the Trainer has none."""
    global _session_of_trainer
    _session_of_trainer = session_of_trainer
    hf.wrap_fsdp_load_optimizer(_before_fsdp_load)
    if importlib.util.find_spec("deepspeed") is not None:
        hf.wrap_deepspeed_init(_before_deepspeed_init)
        hf.wrap_deepspeed_load_checkpoint(_before_deepspeed_load)


def _session_of(trainer) -> Optional[SpectrumSession]:
    return _session_of_trainer(trainer) if trainer is not None and _session_of_trainer is not None else None


def _before_deepspeed_init(trainer) -> None:
    session = _session_of(trainer)
    if session is None:
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
    device = getattr(trainer.args, "device", None)
    session.preselect(state, lambda units: whole([p for u in units for p in u.params]),
                      device=device if getattr(device, "type", None) == "cuda" else None)
    split_for_dynamic(trainer, session.dynamic, resuming=bool(resume_dir))


def _before_deepspeed_load(engine, checkpoint_path: str) -> None:
    session = SpectrumSession.of(engine.module)
    if session is None or SpectrumState.find([checkpoint_path]) is None:
        return
    backend = lay_out_as_saved(session.trainer, engine, checkpoint_path)
    if backend is not None:
        session.adopt_backend(backend)


def _before_fsdp_load(fsdp_plugin, model, input_dir: str) -> None:
    if getattr(fsdp_plugin, "fsdp_version", 1) != 2:
        return
    state = SpectrumState.find([str(input_dir)])
    if state is None:
        return
    if SpectrumSession.of(model) is None:
        trainer, _ = hf.find_trainer(lambda t: _session_of(t) is not None)  # load_fsdp_optimizer is not given it
        if trainer is None:
            return
    if state.trainable is None:
        raise ValueError(
            f"{state.source} lacks the list of trainable parameters that an FSDP2 resume needs; resume from a "
            "checkpoint written by this version, or start the run afresh")
    _frozen.restore_trainable(model, state.trainable)
    if _dist.is_main():
        logger.info("Spectrum: FSDP2 resume: %d parameters trainable as saved, before the optimizer state loads",
                    len(state.trainable))
