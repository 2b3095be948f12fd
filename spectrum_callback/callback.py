"""``SpectrumCallback``: the Hugging Face Trainer's adapter over :class:`~spectrum_callback.SpectrumSession`."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence

import torch
from transformers import TrainerCallback

from . import _dist
from ._fence.transformers_internals import find_trainer
from ._logging import follow_trainer, get_logger
from .candidates import SHARDED_HELP
from .config import SpectrumConfig
from .freeze import apply_selection, spectrum_freeze
from .integrations.transformers_hooks import install_hooks
from .session import SpectrumSession
from .state import STATE_FILE, SpectrumState, read_parked, write_parked

logger = get_logger(__name__)

__all__ = ["SpectrumCallback", "spectrum_freeze", "apply_selection", "STATE_FILE"]


class SpectrumCallback(TrainerCallback):
    """Spectrum as a Trainer callback: train the highest-SNR matrices of each type, freeze the rest.

    Example::

        spectrum = SpectrumCallback(top_pct=0.25, update_every=200)
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[spectrum])
        trainer.train()
        spectrum.selected                        # the modules trainable now

    When freezing happens: before the Trainer builds the DeepSpeed optimizer (a hook), else at
    ``on_train_begin``; dynamic mode re-selects at ``on_step_begin`` of every ``update_every``-th
    optimizer step: leavers lose their optimizer state, joiners start fresh, stayers keep theirs.
    The run is a :class:`~spectrum_callback.SpectrumSession` (:attr:`session`); this class maps
    the Trainer's events to it, its metrics to ``trainer.log`` and its state to checkpoints.

    Args (validated by :class:`~spectrum_callback.SpectrumConfig`, which documents each):
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        update_every: ``None`` for static Spectrum, or re-scan every N optimizer steps.
        include / exclude: regexes on module names defining the candidate matrices.
        always_train: regexes on parameter names kept trainable and never scanned.
        never_train: regexes on candidate module names that are scanned but never selected.
        min_per_type: at least this many matrices per type.
        snr_json: an SNR file or mapping for the first selection instead of a scan.
        method: SNR route, ``"auto"``, ``"fast"``, ``"gram"`` or ``"svd"`` (the original's).
        dtype: precision of the SNR work (``None``: per method and device).
        chunk_mb: most MiB of matrix copies one solver call holds.
        plot_dir: write ``spectrum_snr.png`` (and ``spectrum_selection.png``) there at train end.
        verbose: log a one-line summary at every scan (INFO; level from ``TrainingArguments.log_level``).
        train_heads: train the task heads a ``*For...`` model adds to its base model.
        policy: how each selection chooses: ``"scan"`` (re-scan, top by SNR), ``"rotate"``,
            ``"random"``, ``"cyclic"`` (:mod:`spectrum_callback.policies`) or your own object.
        pool_pct: the pool ``"rotate"`` moves through, per type (default ``min(1, 2 * top_pct)``).
        park_state: moving policies keep a leaver's optimizer state in host memory for its return.
        seed: seed of ``"random"`` (``None``: ``TrainingArguments.seed``).

    Attributes:
        selected: sorted names of the modules trainable now.
        history: one dict per selection (``step``, ``selected``, ``snr``, ``types``, ``joined``, ``left``, ``source``).
        session / analyzer / backend: the run, its analyzer and its optimizer backend.
    """

    def __init__(self, top_pct: float = 0.25, update_every: Optional[int] = None,
                 include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None,
                 always_train: Sequence[str] = (), never_train: Sequence[str] = (), min_per_type: int = 1,
                 snr_json=None, method: str = "auto", dtype: Optional[torch.dtype] = None, chunk_mb: float = 512,
                 plot_dir: Optional[str] = None, verbose: bool = True, train_heads: bool = True, policy="scan",
                 pool_pct: Optional[float] = None, park_state: bool = False, seed: Optional[int] = None):
        self.config = SpectrumConfig(
            top_pct=top_pct, update_every=update_every, include=include, exclude=exclude,
            always_train=list(always_train or []), never_train=list(never_train or []), min_per_type=min_per_type,
            snr_json=snr_json, method=method, dtype=dtype, chunk_mb=chunk_mb, plot_dir=plot_dir, verbose=verbose,
            train_heads=train_heads, policy=policy, pool_pct=pool_pct, park_state=park_state, seed=seed)
        install_hooks()
        self.session: Optional[SpectrumSession] = None
        self.trainer = None
        self._pending_logs: Dict[str, float] = {}

    @classmethod
    def from_config(cls, config: SpectrumConfig) -> "SpectrumCallback":
        return cls(**{k: getattr(config, k) for k in config.__dataclass_fields__})

    dynamic = property(lambda self: self.config.dynamic)
    selected = property(lambda self: list(self.session.selected) if self.session else [])
    history = property(lambda self: self.session.history if self.session else [])
    last_scan_step = property(lambda self: self.session.last_scan_step if self.session else None)
    analyzer = property(lambda self: self.session.analyzer if self.session else None)
    backend = property(lambda self: self.session.backend if self.session else None)

    def session_for(self, trainer, model) -> SpectrumSession:
        """This callback's session on ``model`` (a new one for a model it has not driven)."""
        if self.session is not None and self.session.model is not model:
            logger.warning("Spectrum: this callback was used with another model before; starting afresh for this one")
            self.session.close()
            self.session = None
        if self.session is None:
            cfg = self.config
            if cfg.seed is None and getattr(getattr(trainer, "args", None), "seed", None) is not None:
                cfg = dataclasses.replace(cfg, seed=trainer.args.seed)  # the same sequence on every rank
            self.session = SpectrumSession(model, None, cfg, log=self._log)
        self.trainer = self.session.trainer = trainer
        self.session.progress = not getattr(getattr(trainer, "args", None), "disable_tqdm", False)
        return self.session

    def _log(self, metrics: Dict[str, float]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))
        else:  # the Trainer could not be found: the metrics ride on the next log entry
            self._pending_logs.update(metrics)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None:
            raise ValueError("SpectrumCallback needs the model at on_train_begin; use it with transformers.Trainer")
        follow_trainer(args)  # routine messages at INFO, shown with TrainingArguments(log_level="info")
        # The running Trainer, found once (no public API hands it to callbacks).
        trainer, resume_dir = find_trainer(lambda t: self in getattr(t.callback_handler, "callbacks", []))
        plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
        if getattr(trainer, "is_fsdp_enabled", False) and int(getattr(plugin, "fsdp_version", 1) or 1) != 2:
            raise ValueError(f"the Trainer runs FSDP1 (TrainingArguments.fsdp or an accelerate FSDP config): "
                             f"{SHARDED_HELP}")
        if trainer is not None:
            n = sum(isinstance(cb, SpectrumCallback) for cb in trainer.callback_handler.callbacks)
            if n > 1:
                raise ValueError(
                    f"the Trainer holds {n} SpectrumCallbacks: they would overwrite each other's selection and "
                    "leave optimizer state on frozen weights. Keep one (trainer.remove_callback(...))")
        session = self.session_for(trainer, model)
        session._rebind(optimizer, kwargs.get("lr_scheduler"))
        saved = None
        if state.global_step > 0:
            wanted = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
            saved = SpectrumState.find([resume_dir, wanted,
                                        os.path.join(args.output_dir, f"checkpoint-{state.global_step}")])
            if saved is None:
                logger.warning("Spectrum: resuming at step %d but the checkpoint has no %s (trained without "
                               "Spectrum?); scanning afresh", state.global_step, STATE_FILE)
        if saved is not None:
            session.load_state_dict(saved, step=state.global_step)
            session.load_parked_state_dict(read_parked(os.path.dirname(saved.source), _dist.rank()))
        else:
            session.start(state.global_step)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.session is not None and self.session._started:
            self.session.maybe_switch(state.global_step)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending_logs and logs is not None:
            logs.update(self._pending_logs)
            self._pending_logs.clear()
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder) and self.session is not None:
            write_parked(folder, self.session.parked_state_dict(), _dist.rank())  # every rank its own part
            if state.is_world_process_zero:
                self.save_state(os.path.join(folder, STATE_FILE), state.global_step)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        session = self.session
        if session is None:
            return control
        best = getattr(state, "best_model_checkpoint", None)
        if args.load_best_model_at_end and best and session.analyzer is not None:
            saved = SpectrumState.find([best])  # the weights are that checkpoint's now: so is the selection
            if saved is not None and saved.selected != session.selected:
                session._restore_selection(saved)
        if self.config.plot_dir and state.is_world_process_zero and session.history:
            from .plotting import write_plots

            write_plots(session.history, session.selected, self.config.plot_dir)
        session.close()
        return control

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint needs to resume the same run (:meth:`SpectrumSession.state_dict`):
        settings, selection, history, schedule, tagged with a format name and version."""
        if self.session is None:
            return SpectrumState(selected=[], config=self.config.to_dict()).to_dict()
        return self.session.state_dict()

    def save_state(self, path: str, global_step: Optional[int] = None) -> str:
        """Write :meth:`state_dict` (plus ``global_step``) to ``path`` as JSON, atomically (at
        every checkpoint: ``checkpoint-N/spectrum_state.json``, main process).  Returns ``path``."""
        st = SpectrumState.from_dict(self.state_dict())
        st.global_step = global_step
        return st.write(path)

