"""``SpectrumCallback``: the Hugging Face Trainer's adapter over :class:`~spectrum_callback.SpectrumSession`."""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional

from transformers import TrainerCallback

from . import _dist
from ._fence.transformers_internals import find_trainer
from ._logging import follow_trainer, get_logger
from .candidates import SHARDED_HELP
from .config import SpectrumConfig
from .integrations.transformers_hooks import install_hooks
from .plotting import write_plots
from .session import SpectrumSession
from .state import STATE_FILE, SpectrumState, read_parked, write_parked

logger = get_logger(__name__)

__all__ = ["SpectrumCallback", "session_of_trainer", "STATE_FILE"]


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

    Args:
        top_pct: fraction of each matrix type kept trainable, in (0, 1].
        update_every: ``None`` for static Spectrum, or a new selection every N optimizer steps.
        **settings: any other setting of :class:`~spectrum_callback.SpectrumConfig` (``policy``,
            ``park_state``, ``always_train``, ...), which declares, documents and validates
            every setting (``docs/guide/configuration.md``).

    Attributes:
        config: the :class:`~spectrum_callback.SpectrumConfig`.
        selected: sorted names of the modules trainable now.
        history: one dict per selection (``step``, ``selected``, ``snr``, ``types``, ``joined``, ``left``, ``source``).
        session / analyzer / backend: the run, its analyzer and its optimizer backend.
    """

    def __init__(self, top_pct: float = 0.25, update_every: Optional[int] = None, **settings):
        self.config = SpectrumConfig.from_settings(top_pct=top_pct, update_every=update_every, **settings)
        install_hooks(session_of_trainer)
        self.session: Optional[SpectrumSession] = None
        self.trainer = None
        self._pending_logs: Dict[str, float] = {}

    @classmethod
    def from_config(cls, config: SpectrumConfig) -> "SpectrumCallback":
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})

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
        session.bind(optimizer, kwargs.get("lr_scheduler"))
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
        if self.session is not None and self.session.started:
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
                session.restore(saved)
        if self.config.plot_dir and state.is_world_process_zero and session.history:
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



def session_of_trainer(trainer) -> Optional[SpectrumSession]:
    """The session of ``trainer``'s one :class:`SpectrumCallback` on the Trainer's model (made
    when the callback has none yet), for the Trainer hooks that run before any callback event;
    ``None`` when the Trainer has no SpectrumCallback, or several (``on_train_begin`` refuses
    those)."""
    cbs = [cb for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", [])
           if isinstance(cb, SpectrumCallback)]
    if len(cbs) != 1:
        return None
    return cbs[0].session_for(trainer, trainer.model)
