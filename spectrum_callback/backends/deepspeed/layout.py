"""The layout tag that the DeepSpeed backend writes into each torch param group.

Every torch param group of an optimizer this backend laid out carries, under
``LAYOUT_KEY``, its class (the index of the Trainer's param group its hyperparameters come
from), its Adam step count, its parameters' names and every class's hyperparameters.
DeepSpeed saves the param groups with the optimizer state, so a resumed run rebuilds the
same layout from them before DeepSpeed loads the checkpoint (:mod:`.resume`).
"""
from __future__ import annotations

from typing import List

import torch

LAYOUT_KEY = "spectrum_layout"


def hp_of(group: dict) -> dict:
    """A torch param group's hyperparameters: all but its parameters, its layout tag and
    DeepSpeed's own entries."""
    return {k: v for k, v in group.items() if k not in ("params", LAYOUT_KEY) and not str(k).startswith("_ds")}


def step_of(state: dict) -> int:
    """Adam's step count in a flat partition's state (0 before its first step)."""
    if "step" not in state:
        return 0
    v = state["step"]
    return int(float(v.item()) if torch.is_tensor(v) else float(v))


def layout_tag(c: int, step: int, names: List[str], classes: List[dict], **extra) -> dict:
    """What a torch param group carries under ``LAYOUT_KEY``."""
    return {"class": c, "step": step, "params": list(names), "classes": [dict(x) for x in classes], **extra}
