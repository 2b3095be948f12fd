"""Selection policies: which candidates train at each selection.

A policy sees the candidates (names in model order, their types and layer indices), the
per-type budget and, when it asks for them, their SNRs; it returns the names to train.  The
session does everything else the same way for every policy: freezing, the optimizer switch
(leavers' state dropped or parked, joiners fresh, stayers kept), agreement across ranks,
history, metrics, checkpoints.

Built-ins (a string in ``SpectrumConfig(policy=...)`` picks one):

* ``"scan"``: at every selection, re-scan and keep the top ``top_pct`` of each type by SNR;
* ``"rotate"``: one scan at the start; the pool is the top ``pool_pct`` of each type by SNR,
  and the active set moves through the pool in windows of the per-type budget, in SNR order,
  so that every pool member is active at least once in every ``ceil(pool / budget)``
  consecutive selections (the pool is not re-scanned: a frozen matrix's SNR does not move);
* ``"random"``: a fresh random ``top_pct`` of each type at every selection (LISA's schedule,
  with the optimizer following); the analyzer never runs;
* ``"cyclic"``: the next contiguous window of layers of each type, in layer order, wrapping
  around (BAdam's block order, per type); the analyzer never runs.

A policy of your own: subclass :class:`SelectionPolicy` (``needs_snr``, ``select``,
``state_dict``, ``load_state_dict``) and pass the object as ``policy=``.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence

from .selection import top_per_type, type_budget

__all__ = ["SelectionPolicy", "PolicyInput", "ScanPolicy", "RotatePolicy", "RandomPolicy", "CyclicPolicy",
           "BUILTIN_POLICIES", "ROTATING_POLICIES", "make_policy"]


@dataclass
class PolicyInput:
    """What a policy chooses from.

    Attributes:
        names: the candidates, in model order.
        types: candidate -> its type (the unit of the per-type budget).
        layers: candidate -> its layer index (``None`` outside numbered layers).
        budget: type -> how many of that type train.
        eligible: candidate -> whether it may be selected (not ``never_train``, SNR not NaN).
        snr: candidate -> SNR, when the policy asked for a scan (else ``None``).
    """

    names: List[str]
    types: Dict[str, str]
    layers: Dict[str, Optional[int]]
    budget: Dict[str, int]
    eligible: Dict[str, bool]
    snr: Optional[Dict[str, float]] = None

    def by_type(self) -> Dict[str, List[str]]:
        """type -> its eligible candidates, in model order."""
        out: Dict[str, List[str]] = {}
        for n in self.names:
            out.setdefault(self.types[n], [])
            if self.eligible[n]:
                out[self.types[n]].append(n)
        return out


class SelectionPolicy:
    """The interface of a selection policy (see the module doc)."""

    name = "custom"

    def needs_snr(self, first: bool) -> bool:
        """Whether the next selection needs a scan (``first``: the run's first selection)."""
        raise NotImplementedError

    def select(self, step: int, units: PolicyInput) -> List[str]:
        """The candidates to train from ``step`` on."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """JSON-serialisable state that a resume needs to continue the same sequence."""
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict`."""


class ScanPolicy(SelectionPolicy):
    name = "scan"

    def needs_snr(self, first: bool) -> bool:
        return True

    def select(self, step: int, units: PolicyInput) -> List[str]:
        return top_per_type(units.names, units.types, units.budget, units.snr, units.eligible)


class _Windows(SelectionPolicy):
    """Moves a window of the per-type budget through an ordered list per type."""

    def __init__(self):
        self.phase = 0

    def _window(self, order: Sequence[str], k: int) -> List[str]:
        if len(order) <= k:
            return list(order)
        return [order[(self.phase * k + j) % len(order)] for j in range(k)]

    def state_dict(self) -> dict:
        return {"phase": self.phase}

    def load_state_dict(self, state: Mapping) -> None:
        self.phase = int(state.get("phase", 0))


class RotatePolicy(_Windows):
    name = "rotate"

    def __init__(self, pool_pct: float, min_per_type: int = 1):
        super().__init__()
        self.pool_pct, self.min_per_type = float(pool_pct), int(min_per_type)
        self.pool: Dict[str, List[str]] = {}

    def needs_snr(self, first: bool) -> bool:
        return not self.pool

    def select(self, step: int, units: PolicyInput) -> List[str]:
        if not self.pool:
            pool = type_budget((units.types[n] for n in units.names), self.pool_pct, self.min_per_type)
            size = {t: max(k, units.budget[t]) for t, k in pool.items()}
            picked = top_per_type(units.names, units.types, size, units.snr, units.eligible)
            self.pool = {t: [n for n in picked if units.types[n] == t] for t in units.budget}
        out = [n for typ, order in self.pool.items() for n in self._window(order, units.budget[typ])]
        self.phase += 1
        return out

    def state_dict(self) -> dict:
        return {"phase": self.phase, "pool": {t: list(v) for t, v in self.pool.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        super().load_state_dict(state)
        self.pool = {str(t): list(v) for t, v in (state.get("pool") or {}).items()}


class CyclicPolicy(_Windows):
    name = "cyclic"

    def needs_snr(self, first: bool) -> bool:
        return False

    def select(self, step: int, units: PolicyInput) -> List[str]:
        out = []
        for typ, members in units.by_type().items():
            order = sorted(members, key=lambda n: (units.layers[n] is None, units.layers[n] or 0))
            out += self._window(order, units.budget[typ])
        self.phase += 1
        return out


class RandomPolicy(SelectionPolicy):
    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(int(seed))

    def needs_snr(self, first: bool) -> bool:
        return False

    def select(self, step: int, units: PolicyInput) -> List[str]:
        out = []
        for typ, members in units.by_type().items():
            out += self.rng.sample(members, min(units.budget[typ], len(members)))
        return out

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("rng"):
            version, internal, gauss = state["rng"]
            self.rng.setstate((int(version), tuple(int(x) for x in internal), gauss))


BUILTIN_POLICIES = ("scan", "rotate", "random", "cyclic")
# the policies that move the selection by themselves: they need update_every
ROTATING_POLICIES = ("rotate", "random", "cyclic")


def make_policy(config) -> SelectionPolicy:
    """The policy a :class:`~spectrum_callback.SpectrumConfig` names (or the object it holds)."""
    p = config.policy
    if isinstance(p, SelectionPolicy):
        return p
    if p == "scan":
        return ScanPolicy()
    if p == "rotate":
        return RotatePolicy(config.effective_pool_pct, config.min_per_type)
    if p == "random":
        return RandomPolicy(0 if config.seed is None else config.seed)
    if p == "cyclic":
        return CyclicPolicy()
    raise ValueError(f"policy={p!r} is not known; use one of {', '.join(map(repr, BUILTIN_POLICIES))} "
                     "or a SelectionPolicy object")


def policy_input(names: Sequence[str], types: Mapping[str, str], layers: Mapping[str, Optional[int]], top_pct: float,
                 min_per_type: int, never: Sequence[str], snr: Optional[Mapping[str, float]] = None) -> PolicyInput:
    """The :class:`PolicyInput` of a selection: budgets as ``select_top`` counts them (every
    candidate of a type counts, ``never_train`` and NaN ones are not eligible)."""
    never_re = [re.compile(p) for p in never or []]
    budget = dict(type_budget((types[n] for n in names), top_pct, min_per_type))
    eligible = {n: not any(r.search(n) for r in never_re) and not (snr is not None and math.isnan(snr[n]))
                for n in names}
    return PolicyInput(names=list(names), types=dict(types), layers=dict(layers), budget=budget, eligible=eligible,
                       snr=None if snr is None else dict(snr))
