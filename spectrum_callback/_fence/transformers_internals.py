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
so that the optimizer can be laid out as saved first.  Under FSDP2 it loads the optimizer
through the module-level ``load_fsdp_optimizer`` (accelerate's, imported into
``transformers.trainer``), also before any callback event; :func:`wrap_fsdp_load_optimizer`
lets the trainable set be restored first.  Before either, the Trainer builds the DeepSpeed
optimizer and engine in the module-level ``deepspeed_init``; :func:`wrap_deepspeed_init` lets
the callback select and freeze first, so that start-up never builds the full optimizer.
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


def _wrap_trainer_global(name: str, before: Callable[..., None]) -> bool:
    """Replace the function ``transformers.trainer.<name>`` (once per process) by one that
    calls ``before(*args, **kwargs)`` first.  Returns whether the hook is in place."""
    try:
        import transformers.trainer as tr
    except Exception:  # pragma: no cover
        return False
    orig = getattr(tr, name, None)
    if orig is None or getattr(orig, _HOOKED, False):
        return orig is not None

    def hooked(*args, **kwargs):
        before(*args, **kwargs)
        return orig(*args, **kwargs)

    setattr(hooked, _HOOKED, True)
    hooked.__wrapped__ = orig
    hooked.__name__ = name
    setattr(tr, name, hooked)
    return True


def wrap_deepspeed_load_checkpoint(before_load: Callable[[object, str], None]) -> bool:
    """Wrap ``transformers.trainer.deepspeed_load_checkpoint(engine, checkpoint_path, ...)`` so
    that ``before_load(engine, checkpoint_path)`` runs first."""
    return _wrap_trainer_global(
        "deepspeed_load_checkpoint", lambda engine, checkpoint_path, *a, **k: before_load(engine, checkpoint_path))


def wrap_fsdp_load_optimizer(before_load: Callable[[object, object, str], None]) -> bool:
    """Wrap ``transformers.trainer.load_fsdp_optimizer(fsdp_plugin, accelerator, optimizer, model,
    input_dir, ...)`` so that ``before_load(fsdp_plugin, model, input_dir)`` runs first."""
    return _wrap_trainer_global(
        "load_fsdp_optimizer",
        lambda plugin, accelerator, optimizer, model, input_dir, *a, **k: before_load(plugin, model, input_dir))


def wrap_deepspeed_init(before_init: Callable[[object], None]) -> bool:
    """Wrap ``transformers.trainer.deepspeed_init(trainer, ...)`` so that ``before_init(trainer)``
    runs first (not for ``inference=True``): ``Trainer._prepare_for_training`` calls it to create
    the optimizer (from the parameters that require grad) and the engine right after."""

    def before(trainer, *args, **kwargs):
        if not kwargs.get("inference", False):
            before_init(trainer)

    return _wrap_trainer_global("deepspeed_init", before)
