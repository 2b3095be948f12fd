"""Start-up under DeepSpeed: the optimizer the Trainer is about to build, laid out for switches.

The Trainer builds its optimizer, and DeepSpeed its ZeRO optimizer with an fp32 master
partition of every parameter that requires grad, inside ``train()`` before any callback
event (``Trainer._prepare_for_training`` -> ``deepspeed_init``).  The Trainer hook
(:mod:`spectrum_callback.integrations.transformers_hooks`) lets the session select and
freeze first, so that the optimizer is built over the selection only, and then calls
:func:`split_for_dynamic`.

For dynamic Spectrum at ZeRO stage 1/2 (not on a resume, which loads the checkpoint's own
layout) the Trainer's optimizer is split into one param group per parameter
(:func:`~.backend.one_group_per_parameter`, through a one-shot wrapper of
``trainer.create_optimizer``, which ``deepspeed_init`` calls): the layout the backend keeps at
every rebuild, so that a staying parameter's slice of the fp32 master and Adam state is the
same on each rank after a rebuild and a switch moves nothing between ranks.
"""
from __future__ import annotations

from .backend import one_group_per_parameter

_WRAPPED = "_spectrum_split"


def split_for_dynamic(trainer, dynamic: bool, resuming: bool) -> bool:
    """Split the optimizer ``trainer`` is about to create when a dynamic run at ZeRO-1/2
    starts afresh; returns whether it will be."""
    if not dynamic or resuming or zero_stage(trainer) not in (1, 2):
        return False
    _split_when_created(trainer)
    return True


def zero_stage(trainer) -> int:
    """The ZeRO stage of the config ``deepspeed_init`` is about to use; 0 when it has an
    'optimizer' block (DeepSpeed builds that one; the backend refuses it later)."""
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    cfg = getattr(getattr(plugin, "hf_ds_config", None), "config", None)
    if not isinstance(cfg, dict) or "optimizer" in cfg:
        return 0
    try:
        return int((cfg.get("zero_optimization") or {}).get("stage", 0))
    except (TypeError, ValueError):  # "auto" is resolved by then; anything else: leave the optimizer alone
        return 0


def _split_when_created(trainer) -> None:
    """Wrap ``trainer.create_optimizer`` once: the optimizer it returns (and sets) is split
    into one param group per parameter.  At the first call the instance attribute is put
    back as it was (a user's own instance-level ``create_optimizer`` included)."""
    if getattr(trainer.create_optimizer, _WRAPPED, False):
        return  # still wrapped from a train() call that failed before creating its optimizer
    had = "create_optimizer" in trainer.__dict__
    own = trainer.__dict__.get("create_optimizer")
    orig = trainer.create_optimizer

    def create_optimizer(*args, **kwargs):
        if had:
            trainer.create_optimizer = own
        else:
            trainer.__dict__.pop("create_optimizer", None)
        opt = orig(*args, **kwargs)
        trainer.optimizer = one_group_per_parameter(opt, trainer.model)
        return trainer.optimizer

    setattr(create_optimizer, _WRAPPED, True)
    trainer.create_optimizer = create_optimizer
