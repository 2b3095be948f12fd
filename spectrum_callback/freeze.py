"""Setting ``requires_grad`` for a selection: :func:`apply_selection` is the one place where
Spectrum freezes and unfreezes parameters (and records which ones it froze, so that the
user's own frozen parameters stay theirs)."""
from __future__ import annotations

from typing import List, Sequence

from torch import nn

from . import _frozen
from .analyzer import SpectrumAnalyzer
from .config import compile_patterns

__all__ = ["apply_selection"]


def apply_selection(
    model: nn.Module,
    analyzer: SpectrumAnalyzer,
    selected: Sequence[str],
    always_train: Sequence[str] = (),
    train_names: Sequence[str] = (),
) -> List[nn.Parameter]:
    """Set ``requires_grad``: the selected modules' parameters and ``always_train`` matches
    train, everything else freezes (and loses its gradient).

    Args:
        model: the model.
        analyzer: the analyzer that knows each candidate's parameters.
        selected: module names to train.
        always_train: regexes of parameter names that train regardless.
        train_names: parameter names that train regardless (the task heads).

    Returns:
        The trainable parameters, each once.
    """
    always = compile_patterns(always_train, "always_train")
    named = set(train_names)
    keep = {id(p) for n in selected for p in analyzer.params_of(n)}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in named or any(r.search(name) for r in always):
            keep.add(id(p))
    trainable, frozen_names = [], []
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        on = id(p) in keep
        if not on:
            frozen_names.append(name)  # every alias of a tied parameter
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.requires_grad_(on)
        if on:
            trainable.append(p)
            _frozen.unmark([p])
        else:
            p.grad = None
            _frozen.mark([p])  # frozen by Spectrum, not by the user
    _frozen.record(model, frozen_names)
    return trainable
