"""Resuming a Spectrum run under DeepSpeed: one path.

The Trainer builds the DeepSpeed engine from the parameters that require grad when
``train()`` starts (all of them) and loads the checkpoint right away, before any callback
event; DeepSpeed's flat optimizer checkpoint would not fit that layout.  So:

1. :func:`install_resume_hook` (from the callback's constructor, when DeepSpeed is
   installed) wraps the Trainer's ``deepspeed_load_checkpoint`` (fenced in
   :mod:`spectrum_callback._fence.transformers_internals`);
2. when the running Trainer has a ``SpectrumCallback`` and the checkpoint was written with
   one (``spectrum_state.json``), :func:`lay_out_as_saved` builds the backend and rebuilds
   the ZeRO optimizer to the saved layout (selection and per-step groups, stored by the
   backend in each param group); then DeepSpeed loads as usual;
3. at ``on_train_begin`` :func:`backend_for` hands that same backend to the callback, whose
   ``_restore`` then applies the saved selection (already in place: the switch is a no-op).
"""
from __future__ import annotations

import os
from typing import Optional

from ... import _frozen
from ..._dist import is_main
from ...config import STATE_FILE
from ..._fence import deepspeed_internals as ds
from ..._fence.transformers_internals import find_trainer, spectrum_callbacks, wrap_deepspeed_load_checkpoint
from ..._logging import get_logger
from ..torch_backend import unwrap_optimizer
from .backend import LAYOUT_KEY, DeepSpeedBackend

logger = get_logger(__name__)

# Attribute of the DeepSpeed engine holding the backend that laid its optimizer out for a
# resume, until the callback takes it (it goes with the engine if no callback does).
_PREPARED = "_spectrum_prepared_backend"


def install_resume_hook() -> bool:
    """Wrap ``transformers.trainer.deepspeed_load_checkpoint`` (idempotent)."""
    return wrap_deepspeed_load_checkpoint(_before_load)


def _before_load(engine, checkpoint_path: str) -> None:
    trainer, _ = find_trainer(spectrum_callbacks)
    if trainer is not None and os.path.isfile(os.path.join(checkpoint_path, STATE_FILE)):
        lay_out_as_saved(trainer, engine, checkpoint_path)


def saved_layout(checkpoint_path: str) -> Optional[list]:
    """The per-group layout this backend stored in the checkpoint's optimizer state."""
    groups = ds.checkpoint_param_groups(checkpoint_path) or []
    layout = [g.get(LAYOUT_KEY) for g in groups]
    if not layout or not all(isinstance(x, dict) for x in layout):
        return None
    return layout


def lay_out_as_saved(trainer, engine, checkpoint_path: str) -> Optional[DeepSpeedBackend]:
    """Rebuild ``engine``'s ZeRO optimizer to the layout saved in ``checkpoint_path``; the
    backend that did it is kept for :func:`backend_for`."""
    layout = saved_layout(checkpoint_path)
    if layout is None:
        return None
    model = engine.module
    by_name = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for x in layout for n in x["params"] if n not in by_name]
    if missing:
        raise ValueError(
            f"{checkpoint_path}: its DeepSpeed optimizer holds parameters this model lacks (e.g. {missing[0]}); "
            "resume with the model the checkpoint was trained with"
        )
    _frozen.restore_trainable(model, [n for x in layout for n in x["params"]])
    backend = DeepSpeedBackend(trainer.optimizer, model, trainer, getattr(trainer, "lr_scheduler", None))
    backend.classes = [dict(c) for c in layout[0]["classes"]]
    backend._find_scheduler()
    spec = [(int(x["class"]), int(x["step"]), [by_name[n] for n in x["params"]]) for x in layout]
    new_params = [p for _, _, ps in spec for p in ps]
    backend.rebuild(new_params, force_fresh={id(p) for p in new_params}, layout=spec)
    engine.__dict__[_PREPARED] = backend
    if is_main():
        logger.info("Spectrum/DeepSpeed: optimizer laid out as saved in %s (%d groups) before loading it",
                    checkpoint_path, len(spec))
    return backend


def backend_for(optimizer, model, trainer=None, lr_scheduler=None) -> DeepSpeedBackend:
    """The backend a resume laid out for this optimizer's engine, or a new one."""
    zero = unwrap_optimizer(optimizer)
    engine = ds.find_engine_of(trainer, zero) if ds.stage(zero) else None
    backend = engine.__dict__.pop(_PREPARED, None) if engine is not None else None
    if backend is not None and backend.zero is zero:
        backend.wrapper = optimizer
        backend.trainer = trainer if trainer is not None else backend.trainer
        backend.lr_scheduler = lr_scheduler if lr_scheduler is not None else backend.lr_scheduler
        return backend
    return DeepSpeedBackend(optimizer, model, trainer, lr_scheduler)
