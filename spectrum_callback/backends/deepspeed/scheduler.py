"""The lr scheduler across the DeepSpeed backend's rebuilds.

The Trainer's scheduler keeps one base lr (and, for ``LambdaLR``, one lr lambda) per param
group of the optimizer it was built for, while a rebuild changes the number and the order
of the groups.  :class:`ClassSchedule` keeps those lists per *class* (the Trainer's
original group a parameter's hyperparameters come from) and, after each rebuild, writes
them back per new group: ``group_class[i]`` is the class of the new optimizer's group
``i``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..._fence.torch_internals import set_scheduler_last_lr
from ..._logging import get_logger

logger = get_logger(__name__)


class ClassSchedule:
    """The lr scheduler's per-group lists, kept per class.

    Attributes:
        sched: the torch scheduler (unwrapped from accelerate's), ``None`` until found.
        sched_base: per class, ``(base lrs, lr lambdas)`` (lambdas empty for a scheduler
            without them); ``None`` until a scheduler is found.
    """

    def __init__(self):
        self.sched = None
        self.sched_base: Optional[Tuple[list, list]] = None

    def find(self, lr_scheduler, trainer, groups: Sequence[dict], classes: List[dict],
             group_class: List[int]) -> None:
        """Find the scheduler (``lr_scheduler``, else the Trainer's) and read its lists per
        class from the optimizer's current torch param ``groups``.  Without one, every group
        keeps its class's lr after a switch (and what was found before stays)."""
        sched = lr_scheduler
        if sched is None and trainer is not None:
            sched = getattr(trainer, "lr_scheduler", None)
        while sched is not None and not hasattr(sched, "base_lrs") and hasattr(sched, "scheduler"):
            sched = sched.scheduler  # accelerate's AcceleratedScheduler
        if sched is None or not hasattr(sched, "base_lrs"):
            logger.warning(
                "Spectrum/DeepSpeed: no lr scheduler found; after a switch every param group keeps the lr of its class"
            )
            return
        self.sched = sched
        base = list(sched.base_lrs)
        lambdas = list(getattr(sched, "lr_lambdas", []) or [])
        if len(base) != len(groups):
            raise ValueError(
                f"the lr scheduler has {len(base)} param groups but the DeepSpeed optimizer {len(groups)}: it was "
                "built before DeepSpeed dropped empty groups; let the Trainer create the scheduler (no 'scheduler' "
                "block and no custom scheduler built before Trainer(...))"
            )
        cls_base, cls_lambda = [], []
        for c, hp in enumerate(classes):
            idx = [i for i, gc_ in enumerate(group_class) if gc_ == c and i < len(base)]
            cls_base.append(base[idx[0]] if idx else float(hp.get("initial_lr", hp.get("lr", 0.0))))
            if lambdas:
                cls_lambda.append(lambdas[idx[0]] if idx else lambdas[0])
        self.sched_base = (cls_base, cls_lambda)

    def class_lrs(self, groups: Sequence[dict], classes: List[dict], group_class: List[int]) -> List[float]:
        """The lr of each class now, read from the optimizer's torch param ``groups`` (the lr
        the scheduler set for the coming step).  A class without a group gets the same
        schedule factor as the first class that has one."""
        n = len(classes)
        lrs: List[Optional[float]] = [None] * n
        for c, g in zip(group_class, groups):
            lrs[c] = float(g["lr"])
        known = [(i, v) for i, v in enumerate(lrs) if v is not None]
        base = self.sched_base[0] if self.sched_base else [c.get("initial_lr", c["lr"]) for c in classes]
        for i in range(n):
            if lrs[i] is None:
                if known and base[known[0][0]]:
                    lrs[i] = known[0][1] * base[i] / base[known[0][0]]
                else:
                    lrs[i] = float(classes[i]["lr"])
        return [float(x) for x in lrs]

    def follow(self, groups: Sequence[dict], group_class: List[int], class_lr: List[float], old_base=None,
               new_base=None) -> None:
        """After a rebuild: the scheduler's lists and the new torch param ``groups``' lrs, per
        group from its class.  A scheduler built over the old torch optimizer itself (the
        Trainer's schedule beside DeepSpeed's ``optimizer`` block) moves to the new one."""
        if self.sched is None or self.sched_base is None:
            return
        if old_base is not None and getattr(self.sched, "optimizer", None) is old_base:
            self.sched.optimizer = new_base
        base, lambdas = self.sched_base
        self.sched.base_lrs = [base[c] for c in group_class]
        if lambdas:
            self.sched.lr_lambdas = [lambdas[c] for c in group_class]
        set_scheduler_last_lr(self.sched, [class_lr[c] for c in group_class])
        for g, c in zip(groups, group_class):
            g["initial_lr"] = base[c]
            g["lr"] = class_lr[c]
