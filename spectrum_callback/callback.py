"""``SpectrumCallback``: Spectrum for the Hugging Face Trainer, static or dynamic."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from . import _dist, _frozen
from ._fence import check_versions
from ._fence.deepspeed_internals import full_numel
from ._fence.transformers_internals import find_trainer
from .analyzer import SHARDED_HELP, SpectrumAnalyzer, task_head_params
from .backends import make_backend
from .config import STATE_FILE, SpectrumConfig, compile_patterns
from .selection import load_snr_json, parse_snr_mapping, select_top
from ._logging import follow_trainer, get_logger

logger = get_logger(__name__)

STATE_FORMAT = "spectrum_callback.state"
STATE_VERSION = 1

__all__ = ["SpectrumCallback", "spectrum_freeze", "apply_selection", "STATE_FILE"]


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


def spectrum_freeze(
    model: nn.Module,
    top_pct: float = 0.25,
    *,
    include=None,
    exclude=None,
    always_train: Sequence[str] = (),
    never_train: Sequence[str] = (),
    min_per_type: int = 1,
    snr_json: Optional[str] = None,
    method: str = "auto",
) -> List[str]:
    """Scan and freeze ``model`` before any optimizer or Trainer exists (static Spectrum).

    Use this when you build the optimizer yourself, or want DDP, DeepSpeed or FSDP never to
    see the frozen weights.  The settings mean what they mean for :class:`SpectrumCallback`
    (validated by :class:`~spectrum_callback.config.SpectrumConfig`).

    Args:
        model: the model (unwrapped).
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        include / exclude / always_train / never_train / min_per_type / snr_json / method:
            as for :class:`SpectrumCallback`.

    Returns:
        The selected module names.
    """
    cfg = SpectrumConfig(top_pct=top_pct, include=include, exclude=exclude, always_train=list(always_train or []),
                         never_train=list(never_train or []), min_per_type=min_per_type, snr_json=snr_json,
                         method=method)
    analyzer = SpectrumAnalyzer(model, include=cfg.include, exclude=cfg.exclude, method=cfg.method)
    snr = _snr_from_json(cfg.snr_json, analyzer) if cfg.snr_json else analyzer.scan()
    selected = select_top(snr, cfg.top_pct, min_per_type=cfg.min_per_type, never=cfg.never_train)
    apply_selection(model, analyzer, selected, cfg.always_train)
    return selected


def _snr_from_json(snr_json, analyzer: SpectrumAnalyzer):
    data = load_snr_json(snr_json) if isinstance(snr_json, (str, os.PathLike)) else parse_snr_mapping(snr_json)
    known = set(analyzer.names)
    snr = {n: info for n, info in data.items() if n in known}
    missing = [n for n in analyzer.names if n not in data]
    if not snr:
        raise ValueError(
            f"snr_json: none of its {len(data)} module names (e.g. {next(iter(data))}) is a candidate of this model "
            f"(e.g. {analyzer.names[0]}); was it made for another model?"
        )
    if missing:
        raise ValueError(
            f"snr_json lacks {len(missing)} candidate modules of this model (e.g. {missing[0]}); rescan the model or "
            "pass exclude=[...] for them"
        )
    return {n: snr[n] for n in analyzer.names}


class SpectrumCallback(TrainerCallback):
    """Spectrum as a Trainer callback: train the highest-SNR matrices of each type, freeze the rest.

    Example::

        from spectrum_callback import SpectrumCallback

        spectrum = SpectrumCallback(top_pct=0.25, update_every=200)
        trainer = Trainer(model=model, args=args, train_dataset=ds)
        trainer.add_callback(spectrum)          # or Trainer(..., callbacks=[spectrum])
        trainer.train()
        spectrum.selected                        # the modules trainable now

    When freezing happens: at ``on_train_begin``, after the Trainer built its optimizer
    (and DeepSpeed its engine) from every trainable parameter.  The callback scans, then
    sets ``requires_grad=False`` and ``grad=None`` on everything outside the selection and
    drops their optimizer state; under DeepSpeed it rebuilds the ZeRO optimizer over the
    selection.  In dynamic mode the same happens at ``on_step_begin`` of every
    ``update_every``-th optimizer step (never inside an accumulation cycle): leavers lose
    their state, joiners start fresh, stayers keep theirs.  To freeze before the Trainer
    exists (your own optimizer, FSDP), use :func:`spectrum_freeze` instead.

    Args:
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        update_every: ``None`` for static Spectrum (one scan at ``on_train_begin``); an
            integer N re-scans every N optimizer steps at ``on_step_begin`` and moves the
            optimizer state with the selection.
        include / exclude: regexes on module names defining the candidate matrices
            (default: every 2-D Linear/Conv1D weight inside numbered layers).
        always_train: regexes on parameter names kept trainable and never scanned, e.g.
            ``[r"^lm_head\\.weight$", r"^model\\.embed_tokens\\.weight$"]`` (what the
            original tool's YAML unfreezes); off by default.
        never_train: regexes on candidate module names that are scanned but never selected.
        min_per_type: at least this many matrices per type (1; 0 = the original's
            truncation, refused where it would leave a type of several matrices empty).
        snr_json: an SNR file (either original format) or mapping to use for the first
            selection instead of a scan.
        method: SNR route, ``"auto"`` (fast, checked against an error model, exact
            fallback; float64 on CUDA), ``"fast"``, ``"gram"`` or ``"svd"`` (the original's).
        dtype: precision of the SNR work (``None``: per method and device).
        chunk_mb: most MiB of matrix copies one solver call holds.
        plot_dir: write the SNR heatmap (``spectrum_snr.png``) there at train end, and for a
            run with more than one scan the selection over time (``spectrum_selection.png``).
        verbose: log a one-line summary at every scan (INFO, through the package's logger,
            whose level follows ``TrainingArguments.log_level``).
        train_heads: train the task heads a ``*For...`` model adds to its base model
            (``classifier``, ``score``, ``qa_outputs``, ...) and the base model's pooler, as
            PEFT does for classification (they start untrained); ``False`` keeps them frozen,
            with a warning.  Causal LMs' ``lm_head`` and embeddings are no task heads: they
            train only through ``always_train``.

    Models: fused MoE expert banks (``[E, n, m]`` parameters) are units of selection with
    the mean of their per-expert SNRs; a model with several stacks of numbered layers
    (vision and language, encoder and decoder) selects per stack (types ``<stack>:<type>``);
    parametrized layers are scanned by their effective weight and train their originals.
    Parameters frozen before the Trainer are respected: never selected, said once.

    Attributes:
        selected: sorted names of the modules trainable now.
        history: one dict per scan: ``step``, ``selected``, ``snr`` (name -> SNR), ``types``,
            ``joined``, ``left``, ``source`` (``"scan"`` or ``"snr_json"``).
        analyzer: the :class:`SpectrumAnalyzer` (from ``on_train_begin`` on).
        backend: the optimizer backend of the engine in use (torch or DeepSpeed ZeRO).

    Every scan's metrics go through ``trainer.log`` (``spectrum/...``), and the state is
    saved with each checkpoint as ``spectrum_state.json`` (see :meth:`state_dict`).
    """

    def __init__(
        self,
        top_pct: float = 0.25,
        update_every: Optional[int] = None,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        always_train: Sequence[str] = (),
        never_train: Sequence[str] = (),
        min_per_type: int = 1,
        snr_json=None,
        method: str = "auto",
        dtype: Optional[torch.dtype] = None,
        chunk_mb: float = 512,
        plot_dir: Optional[str] = None,
        verbose: bool = True,
        train_heads: bool = True,
    ):
        self.config = SpectrumConfig(
            top_pct=top_pct, update_every=update_every, include=include, exclude=exclude,
            always_train=list(always_train or []), never_train=list(never_train or []), min_per_type=min_per_type,
            snr_json=snr_json, method=method, dtype=dtype, chunk_mb=chunk_mb, plot_dir=plot_dir, verbose=verbose,
            train_heads=train_heads,
        )
        _install_hooks()

        self.selected: List[str] = []
        self.history: List[dict] = []
        self.last_scan_step: Optional[int] = None
        self.analyzer: Optional[SpectrumAnalyzer] = None
        self.backend = None
        self.trainer = None
        self._pending_logs: Dict[str, float] = {}
        self._model: Optional[nn.Module] = None
        self._heads: List[str] = []
        self._early: Optional[dict] = None  # a selection made before the optimizer (select_before_optimizer)

    # ------------------------------------------------------------------ helpers
    @property
    def dynamic(self) -> bool:
        return self.config.dynamic

    def __getattr__(self, name):
        # The settings read as attributes too (cb.top_pct, cb.update_every, ...): they live in
        # self.config, validated once.
        if name != "config" and "config" in self.__dict__ and name in _CONFIG_FIELDS:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_config(cls, config: SpectrumConfig) -> "SpectrumCallback":
        """A callback with the settings of ``config`` (a :class:`SpectrumConfig`)."""
        return cls(**{f: getattr(config, f) for f in _CONFIG_FIELDS})

    def _validate_patterns(self, model: nn.Module) -> None:
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        for p in compile_patterns(self.config.always_train, "always_train"):
            if not any(p.search(n) for n in names):
                raise ValueError(
                    f"always_train pattern {p.pattern!r} matches no parameter of the model "
                    f"(parameter names look like {names[0]!r}); fix or drop it"
                )
        for p in compile_patterns(self.config.never_train, "never_train"):
            if not any(p.search(n) for n in self.analyzer.names):
                raise ValueError(
                    f"never_train pattern {p.pattern!r} matches no candidate module "
                    f"(candidates look like {self.analyzer.names[0]!r}); fix or drop it"
                )

    def _check_one_spectrum(self) -> None:
        if self.trainer is None:
            return
        others = [cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, SpectrumCallback)]
        if len(others) > 1:
            raise ValueError(
                f"the Trainer holds {len(others)} SpectrumCallbacks: they would overwrite each other's selection and "
                "leave optimizer state on frozen weights. Keep one (trainer.remove_callback(...))"
            )

    def _leave_out_candidates(self, model: nn.Module, user_frozen) -> None:
        """Candidates the user froze before the Trainer, and those ``always_train`` keeps
        trainable anyway, are never scanned or selected."""
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        always = compile_patterns(self.config.always_train, "always_train")
        frozen, kept = [], []
        for cand in self.analyzer.names:
            pnames = [names.get(id(p), "") for p in self.analyzer.params_of(cand)]
            if pnames and all(n in user_frozen for n in pnames):
                frozen.append(cand)
            elif pnames and any(r.search(pnames[0]) for r in always):  # its weight (a bias alone does not count)
                kept.append(cand)
        if len(frozen) + len(kept) == len(self.analyzer.names):
            raise ValueError(
                "every candidate matrix is frozen by you or kept trainable by always_train: Spectrum has nothing "
                "to select. Unfreeze the model before Trainer(...) (SpectrumCallback freezes at train begin)"
            )
        self.analyzer.drop(frozen + kept)
        if frozen and _dist.is_main():
            logger.warning(
                "Spectrum: %d candidate matrices were frozen before the Trainer (e.g. %s); they stay frozen and are "
                "never selected", len(frozen), frozen[0],
            )

    def _task_heads(self, model: nn.Module, user_frozen) -> List[str]:
        heads = [n for n in task_head_params(model) if n not in user_frozen]
        if heads and _dist.is_main():
            if self.config.train_heads:
                logger.warning("Spectrum: training the task head parameters the base model lacks: %s "
                               "(train_heads=False keeps them frozen)", ", ".join(heads))
            else:
                logger.warning("Spectrum: train_heads=False: the task head %s stays frozen at its initial values",
                               ", ".join(heads))
        return heads if self.config.train_heads else []

    def _new_analyzer(self, model: nn.Module, args, gather, user_frozen, device=None) -> None:
        """The analyzer of ``model``: candidates found, those the user froze or ``always_train``
        keeps left out, task heads named, patterns checked."""
        self.analyzer = SpectrumAnalyzer(
            model, include=self.config.include, exclude=self.config.exclude, method=self.config.method,
            dtype=self.config.torch_dtype, chunk_mb=self.config.chunk_mb, device=device,
            progress=not getattr(args, "disable_tqdm", False), gather=gather,
        )
        self._leave_out_candidates(model, user_frozen)
        self._heads = self._task_heads(model, user_frozen)
        self._validate_patterns(model)

    def _candidate_params(self) -> Dict[str, List[nn.Parameter]]:
        return {n: self.analyzer.params_of(n) for n in self.analyzer.names}

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("SpectrumCallback needs the model at on_train_begin; use it with transformers.Trainer")
        follow_trainer(args)  # routine messages at INFO, shown with TrainingArguments(log_level="info")
        check_versions()  # a warning for versions the fenced internals were not checked on
        # The running Trainer, found once (no public API hands it to callbacks) and passed down.
        self.trainer, resume_dir = find_trainer(lambda t: self in getattr(t.callback_handler, "callbacks", []))
        if getattr(self.trainer, "is_fsdp_enabled", False) and _fsdp_version(self.trainer) != 2:
            # FSDP1: transformers 5.24 hands callbacks the FSDP-wrapped model, which the analyzer
            # refuses too; this check also covers versions that hand over the inner module (whose
            # parameters are views of FSDP's flat shards) and names where FSDP came from.
            raise ValueError(
                f"the Trainer runs FSDP1 (TrainingArguments.fsdp or an accelerate FSDP config): {SHARDED_HELP}"
            )
        self._check_one_spectrum()
        if self._model is not None and model is not self._model:
            logger.warning("Spectrum: this callback was used with another model before; starting afresh for this one")
            self.selected, self.history, self.last_scan_step = [], [], None
        self._model = model
        user_frozen = _frozen.user_frozen_names(model)
        # Data flows one way: model -> analyzer -> selection -> callback -> backend -> optimizer.
        self.backend = make_backend(optimizer, model, self.trainer, kwargs.get("lr_scheduler"))
        early, self._early = self._early, None
        if early is not None and early["model"] is model:
            self.analyzer = early["analyzer"]  # candidates already settled
            self.analyzer.gather = self.backend.gather
            # The engine moved the weights' storage (ZeRO-3 partitions, ZeRO-1/2 flat buffers), not
            # their values: keep the SNRs scanned before it.
            self.analyzer.refresh_keys(self.analyzer.names)
        else:
            early = None
            self._new_analyzer(model, args, self.backend.gather, user_frozen)
        self.backend.prepare(self._candidate_params(), dynamic=self.dynamic)
        self._gradient_checkpointing_inputs(model, args)

        restored = False
        if state.global_step > 0:
            restored = self._restore(args, state, resume_dir)
        if not restored:
            if early is not None and "snr" in early:
                # The optimizer was just built over this selection: a first selection (nothing
                # to move), also on a second train() whose earlier selection differed.
                self._apply(state.global_step, early["snr"], source=early["source"], first=True)
            elif self.config.snr_json is not None and not self.history:
                snr = _snr_from_json(self.config.snr_json, self.analyzer)
                self._apply(state.global_step, snr, source="snr_json")
            else:
                self._scan_and_apply(state.global_step)
        return control

    def select_before_optimizer(self, trainer, resume_dir: Optional[str] = None) -> bool:
        """Select and freeze before ``trainer`` builds its optimizer, so that the optimizer
        (and DeepSpeed's fp32 master partitions) never holds more than the selection.

        Called by the DeepSpeed start-up hook (``backends/deepspeed/startup.py``) right
        before ``deepspeed_init``; ``on_train_begin`` then applies this same selection (the
        optimizer already matches it: nothing is rebuilt) and keeps this analyzer.  ZeRO-3
        weights that ``zero.Init`` partitioned are gathered for the scan (collective; every
        rank calls this).  On a resume the checkpoint's saved selection is applied without a
        scan (the weights are not loaded yet).

        Returns:
            Whether the model was frozen to a selection; ``False`` (nothing changed, the
            optimizer is built over every trainable parameter and the first switch rebuilds
            it, said once in the log) on a resume from a checkpoint without Spectrum state.
        """
        from ._fence.deepspeed_internals import whole

        model = trainer.model
        if resume_dir:
            path = os.path.join(resume_dir, STATE_FILE)
            if not os.path.isfile(path):
                if _dist.is_main():
                    logger.warning(
                        "Spectrum: resuming from %s, which has no %s: the optimizer is built over every trainable "
                        "parameter and rebuilt at on_train_begin (start-up peak as full fine-tuning). Resume from a "
                        "checkpoint written with SpectrumCallback to avoid it", resume_dir, STATE_FILE)
                return False
        self.trainer = trainer
        if self._model is not None and model is not self._model:
            self.selected, self.history, self.last_scan_step = [], [], None
        self._model = model
        user_frozen = _frozen.user_frozen_names(model)
        device = getattr(trainer.args, "device", None)
        self._new_analyzer(model, trainer.args, lambda units: whole([p for u in units for p in u.params]),
                           user_frozen, device=device if getattr(device, "type", None) == "cuda" else None)
        self._early = {"model": model, "analyzer": self.analyzer}
        if resume_dir:
            with open(os.path.join(resume_dir, STATE_FILE)) as fh:
                saved = [n for n in json.load(fh).get("selected", []) if n in self.analyzer.modules]
            apply_selection(model, self.analyzer, saved, self.config.always_train, train_names=self._heads)
            return True
        if self.config.snr_json is not None and not self.history:
            snr, source = _snr_from_json(self.config.snr_json, self.analyzer), "snr_json"
        else:
            snr, source = self.analyzer.scan(), "scan"
        selected, snr = _dist.broadcast_from_main((self._select(snr), dict(snr)))
        apply_selection(model, self.analyzer, selected, self.config.always_train, train_names=self._heads)
        self._early.update(snr=snr, source=source)
        return True

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.dynamic or self.analyzer is None:
            return control
        step = state.global_step
        if step > 0 and step % self.config.update_every == 0 and step != self.last_scan_step:
            self._scan_and_apply(step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only used when the Trainer could not be found: metrics ride on the next log entry.
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            self._pending_logs = {}
        return control

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return control
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            self.save_state(os.path.join(folder, STATE_FILE), state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.config.plot_dir and state.is_world_process_zero and self.history:
            from .plotting import plot_selection_history, plot_snr_heatmap

            os.makedirs(self.config.plot_dir, exist_ok=True)
            last = self.history[-1]
            snr = {n: {"snr": v, "type": last["types"][n], "experts": last.get("experts", {}).get(n)}
                   for n, v in last["snr"].items()}
            plot_snr_heatmap(snr, self.selected, os.path.join(self.config.plot_dir, "spectrum_snr.png"))
            if len(self.history) > 1:  # a single scan: the heatmap's frames already show the selection
                plot_selection_history(self.history, os.path.join(self.config.plot_dir, "spectrum_selection.png"))
        return control

    # ------------------------------------------------------------------ core
    def _gradient_checkpointing_inputs(self, model, args) -> None:
        """Reentrant checkpointing gives no gradients when the block inputs don't require
        grad (frozen embeddings); make the inputs require grad, as PEFT does."""
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not checkpointing or emb is None or not hasattr(model, "enable_input_require_grads"):
            return
        always = compile_patterns(self.config.always_train, "always_train")
        emb_trainable = any(
            p is emb.weight and any(r.search(n) for r in always)
            for n, p in model.named_parameters(remove_duplicate=False)
        )
        if not emb_trainable:
            model.enable_input_require_grads()
            logger.info("Spectrum: gradient checkpointing with frozen embeddings -> enable_input_require_grads()")

    def _scan_and_apply(self, step: int) -> None:
        snr = self.analyzer.scan()
        if self.history:
            # A weight that trained into NaN/Inf: training diverged; stop instead of freezing it.
            broken = [n for n in self.selected if n in snr and math.isnan(snr[n]["snr"])]
            if broken:
                raise RuntimeError(
                    f"Spectrum: at step {step} the trainable matrices {', '.join(broken)} hold NaN/Inf values: "
                    "training diverged. Resume from an earlier checkpoint with a lower learning rate (or gradient "
                    "clipping)"
                )
        self._apply(step, snr, source="scan")

    def _apply(self, step: int, snr, source: str, first: Optional[bool] = None) -> None:
        """A new selection from ``snr``: select, agree across ranks, switch, record, report.
        ``first`` (default: no history yet): nothing outside the selection may keep state,
        and nothing counts as joined or left."""
        selected, snr = self.backend.sync_selection((self._select(snr), dict(snr)))
        first = not self.history if first is None else first
        old, new = set(self.selected), set(selected)
        trainable = self._switch(selected, first)
        self.last_scan_step = step
        self.history.append({
            "step": int(step),
            "selected": list(self.selected),
            "snr": {n: float(i["snr"]) for n, i in snr.items()},
            "types": {n: str(i["type"]) for n, i in snr.items()},
            "experts": {n: list(i["experts"]) for n, i in snr.items() if i.get("experts")},
            "joined": sorted(new - old) if not first else [],
            "left": sorted(old - new) if not first else [],
            "source": source,
        })
        self._report(step, snr, source, trainable, changes=len(old ^ new) // 2 if not first else 0)

    def _select(self, snr) -> List[str]:
        cfg = self.config
        selected = select_top(snr, cfg.top_pct, min_per_type=cfg.min_per_type, never=cfg.never_train)
        if not selected:
            raise ValueError(
                "Spectrum selected no module (every SNR is NaN or excluded by never_train); "
                "check the weights for NaN/Inf and the never_train patterns"
            )
        return selected

    def _switch(self, selected: Sequence[str], first: bool) -> List[nn.Parameter]:
        """Freeze / unfreeze for ``selected`` and let the backend move the optimizer state.
        On the first selection (a start or a resume) nothing outside it may keep state."""
        old, new = set(self.selected), set(selected)
        joining = [p for n in sorted(new - old) for p in self.analyzer.params_of(n)]
        trainable = apply_selection(self._model, self.analyzer, selected, self.config.always_train,
                                    train_names=self._heads)
        if first:
            leaving, joining = [p for p in self._model.parameters() if not p.requires_grad], []
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

    def _report(self, step: int, snr, source: str, trainable, changes: int) -> None:
        n_train = sum(full_numel(p) for p in trainable)
        n_total = sum(full_numel(p) for p in {id(p): p for p in self._model.parameters()}.values())
        metrics = {
            "spectrum/selected_modules": float(len(self.selected)),
            "spectrum/changes": float(changes),
            "spectrum/trainable_params": float(n_train),
            "spectrum/trainable_fraction": n_train / max(n_total, 1),
            "spectrum/optimizer_state_numel": float(self.backend.state_numel()),
        }
        if source == "scan":
            metrics.update({f"spectrum/{k}": float(v) for k, v in self.analyzer.last_scan_stats.items()})
        for typ, vals in _snr_by_type(snr).items():
            finite = [v for v in vals if math.isfinite(v)]
            if finite:
                metrics[f"spectrum/snr_mean/{typ}"] = statistics.fmean(finite)
        self._emit(metrics)
        if self.config.verbose and _dist.is_main():
            logger.info(
                "Spectrum %s at step %d: %d/%d modules trainable (%d params, %.1f%% of the model), %d changed",
                source, step, len(self.selected), len(snr), n_train, 100 * n_train / max(n_total, 1), changes,
            )

    def _emit(self, metrics: Dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:
            self._pending_logs.update(metrics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the same Spectrum run: the settings that shape
        the selection (``top_pct``, ``update_every``, ``min_per_type``), the step of the last
        scan, the current selection and the whole ``history``, tagged with a format name and
        version (a newer version is refused on load)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "top_pct": self.config.top_pct,
            "update_every": self.config.update_every,
            "min_per_type": self.config.min_per_type,
            "config": self.config.to_dict(),
            "last_scan_step": self.last_scan_step,
            "selected": list(self.selected),
            # parameter names that train now (selection, heads, always_train): an FSDP2 resume
            # sets requires_grad from them before the optimizer state loads
            "trainable": [n for n, p in self._model.named_parameters(remove_duplicate=False) if p.requires_grad]
            if self._model is not None else [],
            "history": self.history,
        }

    def save_state(self, path: str, global_step: Optional[int] = None) -> str:
        """Write :meth:`state_dict` (plus ``global_step``) to ``path`` as JSON, atomically
        (a temporary file, then a rename). The callback calls it at every checkpoint
        (``checkpoint-N/spectrum_state.json``, main process only). Returns ``path``."""
        data = self.state_dict()
        data["global_step"] = global_step
        tmp = path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
        return path

    def _restore(self, args, state, resume_dir: Optional[str]) -> bool:
        candidates = []
        if resume_dir:
            candidates.append(resume_dir)
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.append(args.resume_from_checkpoint)
        candidates.append(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        found = [os.path.join(c, STATE_FILE) for c in candidates]
        path = next((f for f in found if os.path.isfile(f)), None)
        if path is None:
            logger.warning(
                "Spectrum: resuming at step %d but the checkpoint has no %s (trained without Spectrum?); "
                "scanning afresh", state.global_step, STATE_FILE,
            )
            return False
        with open(path) as fh:
            data = json.load(fh)
        if data.get("format") != STATE_FORMAT or not isinstance(data.get("version"), int):
            raise ValueError(
                f"{path} is not a spectrum_callback state file; remove it or resume from another checkpoint")
        if data["version"] > STATE_VERSION:
            raise ValueError(
                f"{path} has state version {data['version']}, newer than this spectrum_callback "
                f"understands ({STATE_VERSION}); upgrade spectrum_callback"
            )
        unknown = [n for n in data["selected"] if n not in self.analyzer.modules]
        if unknown:
            raise ValueError(
                f"{path} selects modules this model does not have as candidates (e.g. {unknown[0]}); "
                "the checkpoint belongs to another model or other include/exclude settings"
            )
        self.history = list(data.get("history", []))
        self.last_scan_step = data.get("last_scan_step")
        self.selected = []
        self._switch(list(data["selected"]), first=True)
        if _dist.is_main():
            logger.info("Spectrum: restored selection of %d modules from %s", len(self.selected), path)
        self._apply_changed_settings(data, state.global_step, path)
        return True

    def _apply_changed_settings(self, data: dict, step: int, path: str) -> None:
        """A resume with other selection settings than the checkpoint's: say so, and select
        again under the new ones now, from the saved SNRs when they cover every candidate
        (no scan), else with a scan."""
        saved = data.get("config") or {k: data[k] for k in ("top_pct", "update_every", "min_per_type") if k in data}
        now = self.config.selection_settings()
        changed = {k: (saved[k], v) for k, v in now.items() if k in saved and (saved[k] or None) != (v or None)}
        if not changed:
            return
        logger.warning(
            "Spectrum: resuming from %s with changed settings (%s); the new settings apply from step %d",
            path, ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()), step,
        )
        last = self.history[-1] if self.history else None
        if last is not None and set(last["snr"]) == set(self.analyzer.names):
            snr = {n: {"snr": last["snr"][n], "type": last["types"][n]} for n in self.analyzer.names}
            self._apply(step, snr, source="resume")
        else:
            self._scan_and_apply(step)


def _install_hooks() -> None:
    """Under DeepSpeed and FSDP2 the Trainer builds the optimizer and loads a checkpoint before
    any callback event.  Let the callback select before DeepSpeed builds its optimizer
    (backends/deepspeed/startup.py), and the backends lay the optimizer out as saved before a
    checkpoint loads (backends/deepspeed/resume.py, backends/fsdp2_resume.py)."""
    import importlib.util

    from .backends.fsdp2_resume import install_resume_hook as install_fsdp2_hook

    install_fsdp2_hook()
    if importlib.util.find_spec("deepspeed") is None:
        return
    from .backends.deepspeed import install_resume_hook, install_startup_hook

    install_resume_hook()
    install_startup_hook()


def _fsdp_version(trainer) -> int:
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    return int(getattr(plugin, "fsdp_version", 1) or 1)


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(SpectrumConfig))


def _snr_by_type(snr) -> Dict[str, List[float]]:
    out: Dict[str, List[float]] = {}
    for _, info in snr.items():
        out.setdefault(str(info["type"]), []).append(float(info["snr"]))
    return out

