"""Resuming a Spectrum run under DeepSpeed: the optimizer laid out as saved, before it loads.

The Trainer builds the DeepSpeed engine when ``train()`` starts and loads a checkpoint right
away, before any callback event; DeepSpeed's flat optimizer checkpoint only fits the layout
it was saved from.  The Trainer hook (:mod:`spectrum_callback.integrations.transformers_hooks`)
therefore calls :func:`lay_out_as_saved` when the checkpoint holds ``spectrum_state.json``:
the ZeRO optimizer is rebuilt to the saved layout (selection and per-step groups, stored by
the backend in each param group), then DeepSpeed loads as usual.  The session takes that
backend over (:func:`rebind`) and applies the saved selection, which is already in place.
"""
from __future__ import annotations

from typing import Optional

from ... import _frozen
from ..._dist import is_main
from ..._fence import deepspeed_internals as ds
from ..._logging import get_logger
from ..torch_backend import unwrap_optimizer
from .backend import LAYOUT_KEY, DeepSpeedBackend

logger = get_logger(__name__)


def saved_layout(checkpoint_path: str) -> Optional[list]:
    """The per-group layout this backend stored in the checkpoint's optimizer state."""
    groups = ds.checkpoint_param_groups(checkpoint_path) or []
    layout = [g.get(LAYOUT_KEY) for g in groups]
    if not layout or not all(isinstance(x, dict) for x in layout):
        return None
    return layout


def lay_out_as_saved(trainer, engine, checkpoint_path: str) -> Optional[DeepSpeedBackend]:
    """Rebuild ``engine``'s ZeRO optimizer to the layout saved in ``checkpoint_path``.
    Returns the backend that did it (``None`` for a checkpoint without that layout)."""
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
    backend.find_scheduler()
    spec = [(int(x["class"]), int(x["step"]), [by_name[n] for n in x["params"]]) for x in layout]
    new_params = [p for _, _, ps in spec for p in ps]
    backend.rebuild(new_params, force_fresh={id(p) for p in new_params}, layout=spec)
    if is_main():
        logger.info("Spectrum/DeepSpeed: optimizer laid out as saved in %s (%d groups) before loading it",
                    checkpoint_path, len(spec))
    return backend


def rebind(backend, optimizer, trainer=None, lr_scheduler=None) -> bool:
    """Let ``backend`` (built by :func:`lay_out_as_saved`) serve ``optimizer``, the wrapper the
    Trainer hands over later, if it wraps the ZeRO optimizer that backend built.  Returns
    whether it does."""
    if not isinstance(backend, DeepSpeedBackend) or backend.zero is not unwrap_optimizer(optimizer):
        return False
    backend.wrapper = optimizer
    backend.trainer = trainer if trainer is not None else backend.trainer
    backend.lr_scheduler = lr_scheduler if lr_scheduler is not None else backend.lr_scheduler
    return True
