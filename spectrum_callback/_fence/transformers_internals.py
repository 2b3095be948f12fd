"""transformers internals (checked with transformers 5.24).

Trainer callbacks get the model, optimizer and scheduler but not the Trainer.  The
callback needs it for ``trainer.log`` (metrics reach every ``report_to`` integration), the
``resume_from_checkpoint`` folder of the running ``train()`` call, and the DeepSpeed
engine; no public API hands it over, so :func:`find_trainer` walks the call stack once.
If that fails the callback still works (metrics ride on the next regular log entry, the
checkpoint folder is derived from ``output_dir`` and ``global_step``).

Under DeepSpeed the Trainer loads a checkpoint right after it built the engine, before any
callback event (``Trainer._prepare_for_training`` calls the module-level
``deepspeed_load_checkpoint``); :func:`wrap_deepspeed_load_checkpoint` wraps that function
so that the optimizer can be laid out as saved first.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional, Tuple

_HOOKED = "_spectrum_resume_hook"


def find_trainer(wanted: Callable[[object], bool], depth: int = 60) -> Tuple[Optional[object], Optional[str]]:
    """``(trainer, resume_from_checkpoint)``: the innermost ``Trainer`` on the call stack for
    which ``wanted(trainer)`` is true, and the ``resume_from_checkpoint`` string of its
    ``train()`` frame; ``(None, None)`` when there is none."""
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return None, None
    frame = inspect.currentframe()
    trainer, resume = None, None
    try:
        n = 0
        while frame is not None and n < depth:
            loc = frame.f_locals
            obj = loc.get("self")
            if isinstance(obj, Trainer) and (trainer is None or obj is trainer) and wanted(obj):
                trainer = obj
                r = loc.get("resume_from_checkpoint")
                if isinstance(r, str) and resume is None:
                    resume = r
            frame = frame.f_back
            n += 1
    finally:
        del frame
    return trainer, resume


def wrap_deepspeed_load_checkpoint(before_load: Callable[[object, str], None]) -> bool:
    """Wrap ``transformers.trainer.deepspeed_load_checkpoint`` (once per process) so that
    ``before_load(engine, checkpoint_path)`` runs first.  Returns whether the hook is in place."""
    try:
        import transformers.trainer as tr
    except Exception:  # pragma: no cover
        return False
    orig = getattr(tr, "deepspeed_load_checkpoint", None)
    if orig is None or getattr(orig, _HOOKED, False):
        return orig is not None

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
        before_load(deepspeed_engine, checkpoint_path)
        return orig(deepspeed_engine, checkpoint_path, *args, **kwargs)

    setattr(deepspeed_load_checkpoint, _HOOKED, True)
    deepspeed_load_checkpoint.__wrapped__ = orig
    tr.deepspeed_load_checkpoint = deepspeed_load_checkpoint
    return True


_STARTUP = "_spectrum_startup_hook"


def wrap_deepspeed_init(before_init: Callable[[object], None]) -> bool:
    """Wrap ``transformers.trainer.deepspeed_init`` (once per process) so that
    ``before_init(trainer)`` runs first: ``Trainer._prepare_for_training`` calls it to create
    the optimizer (from the parameters that require grad) and the engine right after.
    Returns whether the hook is in place."""
    try:
        import transformers.trainer as tr
    except Exception:  # pragma: no cover
        return False
    orig = getattr(tr, "deepspeed_init", None)
    if orig is None or getattr(orig, _STARTUP, False):
        return orig is not None

    def deepspeed_init(trainer, *args, **kwargs):
        if not kwargs.get("inference", False):
            before_init(trainer)
        return orig(trainer, *args, **kwargs)

    setattr(deepspeed_init, _STARTUP, True)
    deepspeed_init.__wrapped__ = orig
    tr.deepspeed_init = deepspeed_init
    return True
