"""Which parameters Spectrum itself froze, so that a parameter frozen by the user can be
told apart and respected.  The mark is an attribute of our own on the parameter (a set of
tensors cannot be used: tensors compare element-wise)."""
from __future__ import annotations

from typing import Iterable

_MARK = "_spectrum_frozen_it"


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
