"""``SpectrumSession``: one Spectrum run over a model and its optimizer, in any training loop.

    session = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.25, update_every=10))
    session.start()                   # first selection: scan (or snr_json), freeze, prune the optimizer
    for step, batch in enumerate(loader):
        session.maybe_switch(step)    # before the forward of an optimizer step
        ...

The session owns the model, the analyzer, the optimizer backend, the selection, its history
and the re-scan schedule.  Its phases, in the order a run goes through them:

* :meth:`~SpectrumSession.preselect`: select and freeze before any optimizer or engine exists
  (the DeepSpeed start-up hook, :func:`~spectrum_callback.spectrum_freeze`,
  :func:`~spectrum_callback.spectrum_lora_targets`);
* :meth:`~SpectrumSession.bind`: the run's optimizer, when it is built after the session;
* :meth:`~SpectrumSession.adopt_backend`: an optimizer backend an engine's resume built;
* :meth:`~SpectrumSession.start`, or :meth:`~SpectrumSession.load_state_dict` on a resume;
* :meth:`~SpectrumSession.maybe_switch` before every optimizer step;
* :meth:`~SpectrumSession.restore`: the weights went back to a checkpoint's;
* :meth:`~SpectrumSession.close`.  Data flows one way: model -> analyzer -> selection -> session ->
backend -> optimizer.  It imports nothing from ``transformers`` beyond what the analyzer
needs to recognise layers; :class:`~spectrum_callback.SpectrumCallback` is the Trainer's
adapter over it.

What it takes: a plain model or a DDP one, and a torch optimizer; a model and optimizer
from ``accelerate.Accelerator.prepare`` under DDP or FSDP2.  DeepSpeed is refused here (its
engine is only found, and its checkpoints only laid out, through the Trainer): use
``SpectrumCallback``, or :func:`~spectrum_callback.spectrum_freeze` before the engine exists.
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from accelerate.utils import extract_model_from_parallel
from torch import nn

from . import _dist
from ._fence import check_versions
from ._logging import get_logger, warn_once
from ._params import full_numel, unique_params
from .analyzer import SpectrumAnalyzer
from ._fence.deepspeed_internals import is_zero_optimizer
from .backends import make_backend, unwrap_optimizer
from .candidates import layer_index
from .config import SpectrumConfig
from .freeze import apply_selection
from .metrics import selection_margin, selection_metrics
from .policies import PolicyInput, make_policy, policy_input
from .selection import check_budget, snr_from_json
from .session_setup import build_analyzer, gradient_checkpointing_inputs
from .state import SpectrumState

logger = get_logger(__name__)

__all__ = ["SpectrumSession", "SpectrumUsageError", "Preselection"]

_OWNER = "_spectrum_session"  # model.__dict__ entry: a weak reference to the session that drives it


@dataclass
class Preselection:
    """A selection made before the optimizer existed (:meth:`SpectrumSession.preselect`): the
    analyzer that made it, and for a first selection its SNRs, source and the names; a
    resume's saved selection carries none of the three (``snr is None and selected is None``)."""

    analyzer: SpectrumAnalyzer
    snr: Optional[dict] = None
    source: Optional[str] = None
    selected: Optional[List[str]] = None


class SpectrumUsageError(RuntimeError, ValueError):
    """A session used out of order: ``maybe_switch`` before ``start``, a step that goes
    backwards, two sessions on one model."""


class SpectrumSession:
    """A Spectrum run, apart from any trainer (see the module doc for the loop).

    Args:
        model: the model: plain, DDP-wrapped, or prepared by accelerate (DDP, FSDP2).
        optimizer: its torch optimizer (accelerate's wrapper included).
        config: the settings (:class:`~spectrum_callback.SpectrumConfig`; default: its defaults).
        lr_scheduler: an lr scheduler that must follow the optimizer when an engine rebuilds it.
        log: called with a dict of ``spectrum/...`` metrics at every selection (else they are
            only kept in :attr:`metrics`).
        progress: show a progress bar during scans (main rank).

    Attributes:
        selected: sorted names of the modules trainable now.
        history: one dict per selection: ``step``, ``selected``, ``snr`` (name -> SNR),
            ``types``, ``experts``, ``joined``, ``left``, ``source`` (``"scan"``,
            ``"snr_json"`` or ``"resume"``).
        last_scan_step: the step of the last selection.
        metrics: the last selection's metrics.
        analyzer / backend: the :class:`SpectrumAnalyzer` and the optimizer backend (from
            :meth:`start` or :meth:`load_state_dict` on).
    """

    def __init__(self, model: nn.Module, optimizer, config: Optional[SpectrumConfig] = None, *,
                 lr_scheduler=None, log: Optional[Callable[[Dict[str, float]], None]] = None, progress: bool = True):
        if config is None:
            config = SpectrumConfig()
        if not isinstance(config, SpectrumConfig):
            raise TypeError(f"config must be a SpectrumConfig (SpectrumConfig(top_pct=..., ...)), "
                            f"got {type(config).__name__}")
        self.config = config
        self.policy = make_policy(config)
        self.wrapped = model
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.log = log
        self.progress = progress
        self.selected: List[str] = []
        self.history: List[dict] = []
        self.last_scan_step: Optional[int] = None
        self.metrics: Dict[str, float] = {}
        self.analyzer: Optional[SpectrumAnalyzer] = None
        self.backend = None
        self.trainer = None  # the transformers.Trainer, when the callback drives this session
        self._heads: List[str] = []
        self._step: Optional[int] = None
        self._started = False
        self._early: Optional[Preselection] = None
        self._adopted = None  # a backend a resume hook built for the optimizer to come
        self._idle, self._said_idle = 0, False  # re-scans in a row that changed nothing
        _check_free(self.model, self)

    # ------------------------------------------------------------------ public
    @property
    def dynamic(self) -> bool:
        return self.config.dynamic

    @property
    def started(self) -> bool:
        """Whether :meth:`start` or :meth:`load_state_dict` ran (and :meth:`close` did not since)."""
        return self._started

    @staticmethod
    def of(model: nn.Module) -> Optional["SpectrumSession"]:
        """The session that drives ``model`` (set by :meth:`preselect`, :meth:`start` and
        :meth:`load_state_dict`, cleared by :meth:`close`), or ``None``."""
        ref = _unwrap(model).__dict__.get(_OWNER)
        return ref() if ref is not None else None

    def start(self, step: int = 0) -> List[str]:
        """The first selection: scan (or ``snr_json``), freeze everything else, drop the
        frozen parameters' optimizer state.  ``step``: optimizer steps done so far."""
        if self._started:
            raise SpectrumUsageError("SpectrumSession.start() was called already; call it once, before the loop")
        step = _check_step(step)
        self._prepare()
        early, self._early = self._early, None
        if early is not None and early.selected is not None:
            # The optimizer was built over this selection: a first selection (nothing to move),
            # also on a second run whose earlier selection differed.
            self._apply(step, early.snr, source=early.source, first=True, selected=early.selected)
        elif self.config.snr_json is not None and not self.history:
            self._apply(step, snr_from_json(self.config.snr_json, self.analyzer), source="snr_json")
        else:
            self._select_and_apply(step)
        self._started, self._step = True, step
        return list(self.selected)

    def maybe_switch(self, step: int) -> bool:
        """Re-scan and switch when ``step`` (optimizer steps done so far) is due: every
        ``update_every`` steps in dynamic mode, never in static mode.  Call it before the
        forward of an optimizer step (not inside a gradient accumulation cycle).  Returns
        whether a selection was made."""
        if not self._started:
            raise SpectrumUsageError(
                "SpectrumSession.maybe_switch() before start(): call session.start() once before the loop "
                "(or session.load_state_dict(state) on a resume)")
        step = _check_step(step)
        if self._step is not None and step < self._step:
            raise SpectrumUsageError(
                f"SpectrumSession.maybe_switch(step={step}) after step {self._step}: the step went backwards. Pass "
                "the number of optimizer steps done so far; to go back, load an earlier state into a new session")
        self._step = step
        due = self.dynamic and step > 0 and step % self.config.update_every == 0 and step != self.last_scan_step
        if due:
            self._select_and_apply(step)
        return due

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this run (JSON-serialisable; what the callback
        writes as ``spectrum_state.json``): settings, selection, history, schedule, and the
        parameter names that train now."""
        trainable = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p.requires_grad]
        return SpectrumState(selected=list(self.selected), history=self.history, last_scan_step=self.last_scan_step,
                             step=self._step or 0, config=self.config.to_dict(), trainable=trainable,
                             policy={"name": self.policy.name, "state": self.policy.state_dict()}).to_dict()

    def load_state_dict(self, state: Union[Mapping, SpectrumState], step: Optional[int] = None) -> None:
        """Resume: takes the place of :meth:`start`.  Restores the selection, the history and
        the schedule, freezes accordingly and leaves no optimizer state on a frozen weight;
        then load the optimizer's own state dict and go on with :meth:`maybe_switch`.
        ``step`` (default: the saved one) is where the loop resumes."""
        if self._started:
            raise SpectrumUsageError("SpectrumSession.load_state_dict() after start(): on a resume it takes the place "
                                     "of start(); use it on a new session")
        st = state if isinstance(state, SpectrumState) else SpectrumState.from_dict(state)
        step = st.step if step is None else _check_step(step)
        self._prepare()
        self._early = None
        unknown = [n for n in st.selected if n not in self.analyzer.modules]
        if unknown:
            raise ValueError(f"{st.source} selects modules this model does not have as candidates (e.g. {unknown[0]}); "
                             "the checkpoint belongs to another model or other include/exclude settings")
        self.history, self.last_scan_step, self.selected = list(st.history), st.last_scan_step, []
        if st.policy and st.policy.get("name") == self.policy.name:
            self.policy.load_state_dict(st.policy.get("state") or {})  # the same sequence goes on
        self._switch(st.selected, first=True)
        if _dist.is_main():
            logger.info("Spectrum: restored selection of %d modules from %s", len(self.selected), st.source)
        self._started, self._step = True, step
        self._apply_changed_settings(st, step)

    def parked_state_dict(self) -> dict:
        """This rank's parked optimizer state (``park_state``), by parameter name, for a
        checkpoint beside :meth:`state_dict` (``torch.save``); ``{}`` when nothing is parked."""
        return self.backend.parked_state() if self.backend is not None else {}

    def load_parked_state_dict(self, parked: dict) -> None:
        """Parked state from :meth:`parked_state_dict`, after :meth:`load_state_dict`."""
        if parked:
            self.backend.load_parked(parked)

    def close(self) -> None:
        """Stop driving the model (another session may take it over)."""
        self._started = False
        if self.model.__dict__.get(_OWNER) is not None and self.model.__dict__[_OWNER]() is self:
            del self.model.__dict__[_OWNER]

    # ------------------------------------------------------------------ set-up
    def _prepare(self) -> None:
        """Backend and analyzer for the optimizer, before the first selection."""
        if self.optimizer is None:
            raise ValueError("SpectrumSession needs the optimizer; to freeze before building one, use "
                             "spectrum_freeze(model, ...) (static Spectrum)")
        check_versions()  # a warning for versions the fenced internals were not checked on
        _check_free(self.model, self)
        self._refuse_unsupported()
        self.model.__dict__[_OWNER] = weakref.ref(self)
        adopted, self._adopted = self._adopted, None
        self.backend = make_backend(self.optimizer, self.model, self.trainer, self.lr_scheduler, prepared=adopted)
        if self._early is not None:
            self.analyzer = self._early.analyzer  # candidates already settled
            self.analyzer.gather = self.backend.gather
            # The engine moved the weights' storage (ZeRO partitions, flat buffers), not their
            # values: the SNRs scanned before it still hold.
            self.analyzer.refresh_keys(self.analyzer.names)
        else:
            self.analyzer, self._heads = build_analyzer(self.model, self.config, self.backend.gather,
                                                        progress=self.progress)
        self.backend.prepare({n: self.analyzer.params_of(n) for n in self.analyzer.names}, dynamic=self.dynamic,
                             park_state=self.config.park_state)
        gradient_checkpointing_inputs(self.model, self.config)

    def _refuse_unsupported(self) -> None:
        if self.trainer is None and (type(self.wrapped).__name__ == "DeepSpeedEngine"
                                     or is_zero_optimizer(unwrap_optimizer(self.optimizer))):
            raise ValueError(
                "SpectrumSession under DeepSpeed works through the Trainer only (trainer.add_callback("
                "SpectrumCallback(...))); in a custom loop, call spectrum_freeze(model, ...) before "
                "deepspeed.initialize or accelerator.prepare (static Spectrum)")
        ddp = self.wrapped if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) else None
        if ddp is not None and not ddp.find_unused_parameters:
            raise ValueError(
                "the model is wrapped by DDP with find_unused_parameters=False: the matrices Spectrum freezes then "
                "never get the gradient DDP waits for. Build DDP with find_unused_parameters=True (accelerate: "
                "Accelerator(kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]))")

    def preselect(self, state: Optional[SpectrumState] = None, gather=None, device=None,
                  freeze: bool = True) -> List[str]:
        """The first selection, before any optimizer or engine exists: scan (or ``snr_json``),
        select, and (``freeze``) set ``requires_grad`` so that an optimizer built next holds
        the selection only.  :meth:`start` or :meth:`load_state_dict` then keep this analyzer
        and selection.  Returns the selected module names.

        Args:
            state: a resume's saved selection, applied without a scan.
            gather: how to read whole weights (a sharded engine's; default: they are whole).
            device: where to compute the SNRs (default: each weight's own device).
            freeze: set ``requires_grad`` for the selection (``False``: only select, e.g. to
                place LoRA adapters, :func:`~spectrum_callback.spectrum_lora_targets`).
        """
        _check_free(self.model, self)
        self.model.__dict__[_OWNER] = weakref.ref(self)
        self.analyzer, self._heads = build_analyzer(self.model, self.config, gather, device=device,
                                                    progress=self.progress)
        self._early = Preselection(self.analyzer)
        if state is not None:
            selected = [n for n in state.selected if n in self.analyzer.modules]
            if freeze:
                apply_selection(self.model, self.analyzer, selected, self.config.always_train, train_names=self._heads)
            return selected
        if self.config.snr_json is not None and not self.history:
            snr, source = snr_from_json(self.config.snr_json, self.analyzer), "snr_json"
        else:
            snr = self.analyzer.scan() if self.policy.needs_snr(not self.history) else None
            source = self.policy.name
        selected, snr = _dist.broadcast_from_main((self._select(0, snr), snr if snr is None else dict(snr)))
        if freeze:
            apply_selection(self.model, self.analyzer, selected, self.config.always_train, train_names=self._heads)
        self._early = Preselection(self.analyzer, snr=snr, source=source, selected=list(selected))
        return list(selected)

    def bind(self, optimizer, lr_scheduler=None) -> None:
        """The optimizer (and lr scheduler) of the run about to start: a Trainer builds it after
        the session exists, and its next ``train()`` builds another.  :meth:`start` or
        :meth:`load_state_dict` follows."""
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self._started, self._step = False, None

    def adopt_backend(self, backend) -> None:
        """An optimizer backend that an engine's resume built for this run's optimizer (DeepSpeed
        lays its optimizer out as saved before the checkpoint loads): used from now on when
        the session runs, else from :meth:`start` on."""
        if self._started:
            self.backend = backend
        else:
            self._adopted = backend

    # ------------------------------------------------------------------ selections
    def _select_and_apply(self, step: int) -> None:
        """A selection by the policy: a scan first when it needs SNRs."""
        snr = self.analyzer.scan() if self.policy.needs_snr(not self.history) else None
        if snr is not None and self.history:
            # A weight that trained into NaN/Inf: training diverged; stop instead of freezing it.
            broken = [n for n in self.selected if n in snr and math.isnan(snr[n]["snr"])]
            if broken:
                raise RuntimeError(
                    f"Spectrum: at step {step} the trainable matrices {', '.join(broken)} hold NaN/Inf values: "
                    "training diverged. Resume from an earlier checkpoint with a lower learning rate (or gradient "
                    "clipping)")
        self._apply(step, snr, source=self.policy.name)

    def _apply(self, step: int, snr, source: str, first: Optional[bool] = None,
               selected: Optional[List[str]] = None) -> None:
        """A new selection (``selected``, or the policy's from ``snr``): agree across ranks,
        switch, record, report.  ``first`` (default: no history yet): nothing outside the
        selection may keep state, and nothing counts as joined or left."""
        if selected is None:
            selected = self._select(step, snr)
        selected, snr = self.backend.sync_selection((selected, None if snr is None else dict(snr)))
        first = not self.history if first is None else first
        old, new = set(self.selected), set(selected)
        trainable = self._switch(selected, first)
        self.last_scan_step = step
        entry = {"step": int(step), "selected": list(self.selected),
                 "types": {n: str(t) for n, t in self.analyzer.types.items()},
                 "joined": sorted(new - old) if not first else [], "left": sorted(old - new) if not first else [],
                 "source": source}
        if snr is not None:
            entry["snr"] = {n: float(i["snr"]) for n, i in snr.items()}
            entry["experts"] = {n: list(i["experts"]) for n, i in snr.items() if i.get("experts")}
        self.history.append(entry)
        self._report(step, entry, source, trainable, changes=len(old ^ new) // 2 if not first else 0)

    def _units(self, snr=None) -> PolicyInput:
        cfg, an = self.config, self.analyzer
        return policy_input(an.names, an.types, {n: layer_index(n) for n in an.names}, cfg.top_pct,
                            cfg.min_per_type, cfg.never_train,
                            snr=None if snr is None else {n: float(snr[n]["snr"]) for n in an.names})

    def _select(self, step: int, snr) -> List[str]:
        units = self._units(snr)
        check_budget(units.types.values(), self.config.top_pct, self.config.min_per_type)
        selected = sorted(set(self.policy.select(step, units)))
        unknown = [n for n in selected if n not in self.analyzer.modules]
        if unknown:
            raise ValueError(f"policy {self.policy.name!r} selected {unknown[0]!r}, which is no candidate")
        if not selected:
            raise ValueError("Spectrum selected no module (every SNR is NaN or excluded by never_train); "
                             "check the weights for NaN/Inf and the never_train patterns")
        return selected

    def _switch(self, selected: Sequence[str], first: bool) -> List[nn.Parameter]:
        """Freeze / unfreeze for ``selected`` and let the backend move the optimizer state.
        On a first selection (a start or a resume) nothing outside it may keep state."""
        old, new = set(self.selected), set(selected)
        joining = [p for n in sorted(new - old) for p in self.analyzer.params_of(n)]
        trainable = apply_selection(self.model, self.analyzer, selected, self.config.always_train,
                                    train_names=self._heads)
        if first:
            leaving, joining = [p for p in self.model.parameters() if not p.requires_grad], []
        else:
            leaving = [p for n in sorted(old - new) for p in self.analyzer.params_of(n)]
        result = self.backend.switch(leaving, joining)
        if result.moved:
            # Storage moved with the same values (an engine re-flattened its buffers): the
            # analyzer keeps the SNRs of matrices that did not train.
            self.analyzer.refresh_keys(
                [n for n, m in self.analyzer.modules.items() if any(id(p) in result.moved for p in m.params)])
        self.selected = sorted(selected)
        self.analyzer.mark_dirty(self.selected)
        return trainable

    def restore(self, state: SpectrumState) -> None:
        """The weights were rolled back to ``state``'s checkpoint (the Trainer's
        ``load_best_model_at_end``): its selection and history follow them."""
        known = [n for n in state.selected if n in self.analyzer.modules]
        self._switch(known, first=False)
        self.history, self.last_scan_step = list(state.history), state.last_scan_step

    def _report(self, step: int, entry: dict, source: str, trainable, changes: int) -> None:
        n_train = sum(full_numel(p) for p in trainable)
        n_total = sum(full_numel(p) for p in unique_params(self.model))
        snr, margin = entry.get("snr"), None
        if snr is not None and self.policy.name == "scan":
            margin = selection_margin(snr, entry["types"], self.selected, self._units().eligible)
            self._say_if_idle(changes, margin, first=len(self.history) == 1)
        self.metrics = selection_metrics(
            self.selected, changes, n_train, n_total, self.backend.state_numel(), snr, entry["types"],
            scan_stats=self.analyzer.last_scan_stats if source == "scan" else None, margin=margin,
            parked_bytes=self.backend.parked_bytes() if self.config.park_state else None)
        if self.log is not None:
            self.log(dict(self.metrics))
        if _dist.is_main():
            if len(self.history) == 1 and len(self.selected) > 1.5 * self.config.top_pct * len(entry["types"]) + 1:
                warn_once(logger, f"fraction:{id(self)}", "Spectrum: %d of %d candidate matrices train (%.0f%%), not "
                          "the %.0f%% of top_pct: min_per_type=%d keeps at least that many of each of the %d types",
                          len(self.selected), len(entry["types"]), 100 * len(self.selected) / len(entry["types"]),
                          100 * self.config.top_pct, self.config.min_per_type, len(set(entry["types"].values())))
            if self.config.verbose:
                logger.info("Spectrum %s at step %d: %d/%d modules trainable (%d params, %.1f%% of the model), %d "
                            "changed", source, step, len(self.selected), len(entry["types"]), n_train,
                            100 * n_train / max(n_total, 1), changes)

    def _say_if_idle(self, changes: int, margin: Optional[float], first: bool) -> None:
        """Dynamic scanning that never changes the selection is idle: say how long, and how
        far it is from changing (once per run, then every 10 idle scans in a row)."""
        if first:
            return
        self._idle = 0 if changes else self._idle + 1
        if self._idle and (not self._said_idle or self._idle % 10 == 0) and _dist.is_main():
            self._said_idle = True
            logger.info("Spectrum: %d re-scan(s) in a row changed nothing; the smallest per-type margin is %s "
                        "(how far the best unselected SNR lies below the last selected one). policy='rotate' or "
                        "'random' move the selection", self._idle,
                        "n/a" if margin is None else f"{100 * margin:.3g}%")

    def _apply_changed_settings(self, state: SpectrumState, step: int) -> None:
        """A resume with other selection settings than the checkpoint's: say so, and select
        again under the new ones now, from the saved SNRs when they cover every candidate
        (no scan), else as the policy does."""
        saved = state.config
        now = self.config.selection_settings()
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and (saved[k] or None) != (v or None)}
        if not changed:
            return
        logger.warning("Spectrum: resuming from %s with changed settings (%s); the new settings apply from step %d",
                       state.source, ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()), step)
        last = next((h for h in reversed(self.history) if "snr" in h), None)
        if last is not None and set(last["snr"]) == set(self.analyzer.names) and self.policy.needs_snr(False):
            snr = {n: {"snr": last["snr"][n], "type": last["types"][n]} for n in self.analyzer.names}
            self._apply(step, snr, source="resume")
        else:
            self._select_and_apply(step)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP, DataParallel, a DeepSpeed engine or ``torch.compile``
    (accelerate's public ``extract_model_from_parallel``); an FSDP2 model is its own."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"SpectrumSession needs a torch.nn.Module, got {type(model).__name__}")
    return extract_model_from_parallel(model, keep_torch_compile=False)


def _check_step(step) -> int:
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step={step!r} must be an integer >= 0: the number of optimizer steps done so far")
    return int(step)


def _check_free(model: nn.Module, me: SpectrumSession) -> None:
    ref = model.__dict__.get(_OWNER)
    other = ref() if ref is not None else None
    if other is not None and other is not me and other.started:
        raise SpectrumUsageError(
            "another SpectrumSession already drives this model: two would overwrite each other's selection and "
            "leave optimizer state on frozen weights. Keep one, or call close() on the other first")
