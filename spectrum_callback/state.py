"""``SpectrumState``: what a Spectrum run saves and resumes from, read and checked in one place.

A checkpoint folder of the Trainer holds it as ``spectrum_state.json`` (:data:`STATE_FILE`);
a custom loop gets the same mapping from :meth:`SpectrumSession.state_dict
<spectrum_callback.SpectrumSession.state_dict>`.  Every reader (a session's
``load_state_dict``, the DeepSpeed start-up and resume hooks, the FSDP2 resume hook, the
rollback after ``load_best_model_at_end``) goes through :meth:`SpectrumState.from_dict` or
:meth:`SpectrumState.read`.

Format ``spectrum_callback.state``, version 1: ``selected``, ``history``,
``last_scan_step``, the settings that shape the selection (``top_pct``, ``update_every``,
``min_per_type``) and ``config``, ``trainable`` (the parameter names that trained),
``global_step`` (written by the callback), ``step`` (the last optimizer step the session
saw) and ``policy`` (the selection policy's name and its place in its sequence).  Keys were
added over releases without breaking older readers; files that lack
``config``, ``trainable`` or ``step`` load (``step`` then defaults to ``global_step`` or the
last scan's step).  A newer version than this release knows is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterable, List, Mapping, Optional

__all__ = ["SpectrumState", "STATE_FILE", "STATE_FORMAT", "STATE_VERSION", "optimizer_state_types"]

STATE_FILE = "spectrum_state.json"
STATE_FORMAT = "spectrum_callback.state"
STATE_VERSION = 1


@dataclass
class SpectrumState:
    """A Spectrum run at one step.

    Attributes:
        selected: the selected candidate module names.
        history: one dict per selection (see ``SpectrumSession.history``).
        last_scan_step: the step of the last selection (``None`` before the first).
        step: the last optimizer step the session saw.
        config: the run's settings (``SpectrumConfig.to_dict()``), ``{}`` when unknown.
        trainable: parameter names that trained when saved (selection, heads,
            ``always_train``); ``None`` in files that predate it.
        global_step: the Trainer's step when the callback wrote the file (else ``None``).
        policy: the selection policy's name and state (where it is in its sequence).
        source: where it was read from (for messages), not saved.
    """

    selected: List[str]
    history: List[dict] = field(default_factory=list)
    last_scan_step: Optional[int] = None
    step: int = 0
    config: dict = field(default_factory=dict)
    trainable: Optional[List[str]] = None
    global_step: Optional[int] = None
    policy: Optional[dict] = None
    source: str = "state"

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, data: Mapping, source: str = "the Spectrum state") -> "SpectrumState":
        """Check and read a mapping written by :meth:`to_dict` (any version up to
        :data:`STATE_VERSION`); a clear ``ValueError`` for anything else."""
        if not isinstance(data, Mapping) or data.get("format") != STATE_FORMAT or not isinstance(
                data.get("version"), int) or isinstance(data.get("version"), bool):
            raise ValueError(f"{source} is not a spectrum_callback state; remove it or resume from another checkpoint")
        if data["version"] > STATE_VERSION:
            raise ValueError(
                f"{source} has state version {data['version']}, newer than this spectrum_callback understands "
                f"({STATE_VERSION}); upgrade spectrum_callback")
        selected = data.get("selected")
        if not isinstance(selected, list) or not all(isinstance(n, str) for n in selected):
            raise ValueError(f"{source}: 'selected' must be a list of module names; the file is damaged")
        history = data.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
            raise ValueError(f"{source}: 'history' must be a list of selections; the file is damaged")
        trainable = data.get("trainable")
        if trainable is not None and not isinstance(trainable, list):
            raise ValueError(f"{source}: 'trainable' must be a list of parameter names; the file is damaged")
        config = data.get("config")
        if not isinstance(config, Mapping):  # a minimal file: the top-level selection settings stand for it
            config = {k: data[k] for k in ("top_pct", "update_every", "min_per_type") if k in data}
        last = data.get("last_scan_step")
        global_step = data.get("global_step")
        step = data.get("step")
        if step is None:  # a minimal file: the Trainer's step, else the last selection's
            step = global_step if global_step is not None else (last or 0)
        policy = data.get("policy")
        if policy is not None and (not isinstance(policy, Mapping) or not isinstance(policy.get("name"), str)):
            raise ValueError(f"{source}: 'policy' must name the selection policy; the file is damaged")
        return cls(selected=list(selected), history=[dict(h) for h in history], policy=policy,
                   last_scan_step=None if last is None else int(last), step=int(step), config=dict(config),
                   trainable=None if trainable is None else [str(n) for n in trainable],
                   global_step=None if global_step is None else int(global_step), source=source)

    @classmethod
    def read(cls, path: str) -> "SpectrumState":
        """Read ``path``, or ``path/spectrum_state.json`` when ``path`` is a folder."""
        if os.path.isdir(path):
            path = os.path.join(path, STATE_FILE)
        try:
            with open(path) as fh:
                data = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); remove it or resume from another checkpoint") from exc
        return cls.from_dict(data, source=path)

    @classmethod
    def find(cls, folders: Iterable[Optional[str]]) -> Optional["SpectrumState"]:
        """The state in the first of ``folders`` that holds a state file; ``None`` if none does."""
        for folder in folders:
            if folder and os.path.isfile(os.path.join(folder, STATE_FILE)):
                return cls.read(os.path.join(folder, STATE_FILE))
        return None

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict:
        """JSON-serialisable, with format and version."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "top_pct": self.config.get("top_pct"),
            "update_every": self.config.get("update_every"),
            "min_per_type": self.config.get("min_per_type"),
            "config": dict(self.config),
            "last_scan_step": self.last_scan_step,
            "step": int(self.step),
            "selected": list(self.selected),
            "trainable": None if self.trainable is None else list(self.trainable),
            "history": list(self.history),
            "global_step": self.global_step,
            "policy": self.policy,
        }

    def write(self, path: str) -> str:
        """Write :meth:`to_dict` to ``path`` atomically (a temporary file, then a rename)."""
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self.to_dict(), fh)
        os.replace(tmp, path)
        return path


PARKED_FILE = "spectrum_parked.rank{rank}.pt"


def write_parked(folder: str, parked: dict, rank: int) -> Optional[str]:
    """This rank's parked optimizer state (``park_state``) beside the state file, if any."""
    if not parked:
        return None
    import torch

    path = os.path.join(folder, PARKED_FILE.format(rank=rank))
    torch.save(parked, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def read_parked(folder: str, rank: int) -> dict:
    """What :func:`write_parked` wrote for ``rank`` in ``folder`` (``{}`` when nothing was parked).

    Loaded with ``weights_only=True``: tensors, numbers, strings and containers, plus the
    classes of :func:`optimizer_state_types`, allowed by name.  A file holding anything else,
    which a plain unpickling could run as code, is refused and never executed."""
    path = os.path.join(folder, PARKED_FILE.format(rank=rank))
    if not os.path.isfile(path):
        return {}
    import pickle

    import torch

    # only those not allowed yet: leaving the context removes what it added (torchao adds its
    # own at import, for every load in the process)
    allowed = set(map(id, torch.serialization.get_safe_globals()))
    extra = [t for t in optimizer_state_types() if id(t) not in allowed]
    try:
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds objects other than optimizer-state tensors, which loading could run as code: refused, "
            f"nothing in it was executed ({str(exc).splitlines()[0]}). Restore the file the run wrote, or delete it "
            "to resume with fresh optimizer state for the parked matrices") from None


def optimizer_state_types() -> list:
    """The classes besides tensors that optimizers keep in their state, for ``weights_only``
    loading (those installed): torchao's low-bit tensor subclasses, GaLore's and APOLLO's
    gradient projectors (tensors and numbers)."""
    import importlib

    out = []
    for module, names in (("torchao.optim.subclass_8bit", ["OptimState8bit"]),
                          ("torchao.optim.subclass_4bit", ["OptimState4bit"]),
                          ("torchao.optim.subclass_fp8", ["OptimStateFp8"]),
                          ("galore_torch.galore_projector", ["GaLoreProjector"]),
                          ("apollo_torch.svd_projector", ["GaLoreProjector"]),
                          ("apollo_torch.random_projector", ["GradientProjector"])):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            continue
        try:
            mod = importlib.import_module(module)
        except Exception:  # installed but laid out otherwise
            continue
        out += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return out
