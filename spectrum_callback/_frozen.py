"""Which parameters Spectrum itself froze, so that a parameter frozen by the user can be
told apart and respected.  The mark is an attribute of our own on the parameter (a set of
tensors cannot be used: tensors compare element-wise), and the names are also recorded on
the model: an engine that replaces the parameter objects when it wraps the model (FSDP2's
``fully_shard`` makes new DTensor parameters) loses the attribute, not the model's record."""
from __future__ import annotations

from typing import Iterable

_MARK = "_spectrum_frozen_it"
_NAMES = "_spectrum_frozen_names"


def mark(params: Iterable) -> None:
    for p in params:
        setattr(p, _MARK, True)


def unmark(params: Iterable) -> None:
    for p in params:
        if getattr(p, _MARK, False):
            setattr(p, _MARK, False)


def frozen_by_user(p) -> bool:
    """``p`` does not require grad, and Spectrum did not freeze it."""
    return not p.requires_grad and not getattr(p, _MARK, False)


def record(model, names: Iterable[str]) -> None:
    """Remember on ``model`` the parameter names Spectrum froze (replacing the last record)."""
    model.__dict__[_NAMES] = frozenset(names)


def user_frozen_names(model) -> set:
    """Names of the parameters of ``model`` that do not require grad and that Spectrum did not
    freeze (neither marked nor recorded)."""
    ours = model.__dict__.get(_NAMES, frozenset())
    return {n for n, p in model.named_parameters(remove_duplicate=False) if frozen_by_user(p) and n not in ours}


def restore_trainable(model, trainable: Iterable[str]) -> None:
    """``requires_grad`` as a checkpoint saved it (before a resume loads the optimizer state):
    the parameters named in ``trainable`` train (a tied parameter when any of its names is
    there), the others that train now are frozen, marked and recorded as Spectrum's.
    Parameters frozen already (by the user, before the Trainer) stay the user's."""
    keep = set(trainable)
    aliases: dict = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), (p, []))[1].append(name)
    ours = []
    for p, names in aliases.values():
        on = any(n in keep for n in names)
        if on and not p.requires_grad:
            p.requires_grad_(True)
            unmark([p])
        elif not on and p.requires_grad:
            p.requires_grad_(False)
            mark([p])
        if not on and not frozen_by_user(p):
            ours.extend(names)
    record(model, ours)
