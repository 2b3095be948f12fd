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

For dynamic Spectrum at ZeRO stage 1/2 (not on a resume, which loads the checkpoint's own
layout) the Trainer's optimizer is also split into one param group per parameter
(:func:`one_group_per_parameter`, through a one-shot wrapper of ``trainer.create_optimizer``,
which ``deepspeed_init`` calls), the layout the backend keeps at every rebuild: a staying
parameter's slice of the fp32 master and Adam state is then the same on each rank after a
rebuild, so a switch moves nothing between ranks (:meth:`.backend.DeepSpeedBackend._reusable`).
"""
from __future__ import annotations

from ..._fence.transformers_internals import find_trainer, spectrum_callbacks, wrap_deepspeed_init
from ..._logging import get_logger
from .backend import one_group_per_parameter

logger = get_logger(__name__)


def _before_init(trainer) -> None:
    cbs = spectrum_callbacks(trainer)
    if len(cbs) != 1:  # none, or several (refused at on_train_begin)
        return
    cb = cbs[0]
    _, resume_dir = find_trainer(lambda t: t is trainer)
    selected = cb.select_before_optimizer(trainer, resume_dir)
    # One group per parameter pays off at switches only (dynamic), and a resume must load the
    # checkpoint's own layout (lay_out_as_saved reproduces it; a checkpoint written with the
    # Trainer's groups loads into the Trainer's groups, and the first switch splits them).
    if selected and cb.dynamic and not resume_dir and _zero_stage(trainer) in (1, 2):
        _split_when_created(trainer)


def _zero_stage(trainer) -> int:
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


_WRAPPED = "_spectrum_split"


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


def install_startup_hook() -> bool:
    """Wrap ``transformers.trainer.deepspeed_init`` (idempotent)."""
    return wrap_deepspeed_init(_before_init)
