"""Resuming a Spectrum run under FSDP2 through the Trainer's checkpoints.

The Trainer loads an FSDP2 optimizer checkpoint (accelerate's ``load_fsdp_optimizer``:
``torch.distributed.checkpoint`` with the sharded state dict) before any callback event.
torch first creates the optimizer state it loads into, for every parameter that requires
grad, and the load fails on state the checkpoint lacks; a Spectrum checkpoint has state for
the selection only.  So :func:`install_resume_hook` (from the callback's constructor) wraps
that function (fenced in :mod:`spectrum_callback._fence.transformers_internals`), and when
the checkpoint has ``spectrum_state.json`` and the running Trainer a ``SpectrumCallback``,
:func:`_before_load` sets ``requires_grad`` as it was saved (``trainable``).  The stayers'
state then loads as saved, and ``on_train_begin`` restores the selection and history.
"""
from __future__ import annotations

import json
import os

from .. import _frozen
from .._dist import is_main
from .._fence.transformers_internals import find_trainer, spectrum_callbacks, wrap_fsdp_load_optimizer
from .._logging import get_logger
from ..config import STATE_FILE

logger = get_logger(__name__)


def install_resume_hook() -> bool:
    """Wrap ``transformers.trainer.load_fsdp_optimizer`` (idempotent)."""
    return wrap_fsdp_load_optimizer(_before_load)


def _before_load(fsdp_plugin, model, input_dir: str) -> None:
    path = os.path.join(str(input_dir), STATE_FILE)
    if getattr(fsdp_plugin, "fsdp_version", 1) != 2 or not os.path.isfile(path):
        return
    trainer, _ = find_trainer(spectrum_callbacks)
    if trainer is None:
        return
    with open(path) as fh:
        trainable = json.load(fh).get("trainable")
    if trainable is None:
        raise ValueError(
            f"{path} was written by an older spectrum_callback that did not record the trainable parameters, which "
            "an FSDP2 resume needs; resume from a newer checkpoint or start the run afresh"
        )
    _frozen.restore_trainable(model, trainable)
    if is_main():
        logger.info("Spectrum: FSDP2 resume: %d parameters trainable as saved, before the optimizer state loads",
                    len(trainable))

