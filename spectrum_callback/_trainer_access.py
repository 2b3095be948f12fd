"""Finding the running ``transformers.Trainer`` from inside a callback event.

Trainer callbacks receive model/optimizer/scheduler but not the Trainer itself.  The
callback needs it for two things no public callback API offers: ``trainer.log(...)``
(so Spectrum's metrics reach every ``report_to`` integration) and the
``resume_from_checkpoint`` folder of the current ``train()`` call.  We look up the
call stack for the Trainer whose callback handler holds our callback.  Checked with
transformers 5.24; if the lookup fails the callback still works (metrics then go out
with the next regular log entry, the checkpoint folder is derived from
``output_dir`` and ``global_step``).
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple


def find_trainer(callback) -> Tuple[Optional[object], Optional[str]]:
    """Return ``(trainer, resume_from_checkpoint)`` found on the call stack, or ``(None, None)``."""
    try:
        from transformers import Trainer
    except Exception:  # pragma: no cover
        return None, None
    frame = inspect.currentframe()
    trainer = None
    resume = None
    try:
        depth = 0
        while frame is not None and depth < 60:
            loc = frame.f_locals
            obj = loc.get("self")
            if isinstance(obj, Trainer) and callback in getattr(obj.callback_handler, "callbacks", []):
                trainer = obj
                r = loc.get("resume_from_checkpoint")
                if isinstance(r, str) and resume is None:
                    resume = r
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    return trainer, resume
