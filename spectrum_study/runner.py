"""One configuration of a quality study, trained with ``transformers.Trainer``.

:class:`StudySettings` holds what makes two runs comparable (its :meth:`~StudySettings.signature`
is stored in every run file), :class:`Config` one method at one learning rate and seed, and
:func:`run_config` trains it and returns its record: the held-out and second-domain losses at
every evaluation, training time (wall and CPU, evaluations excluded), trainable parameters,
gradient and optimizer-state bytes.  :func:`load_study_data` builds the default data (the
offline SmolLM2-135M-Instruct, KJV with John and Acts held out, pydoc as the second domain);
:func:`load_runs` reads finished records back.  :mod:`spectrum_study.compare` and
:mod:`spectrum_study.fair` are the two studies built on it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .assets import BlockDataset
from .methods import SEEDED, PeakMemory, build_method

__all__ = ["HELD", "OTHER", "StudySettings", "Config", "as_dataset", "atomic_json", "evaluate_baseline",
           "run_config", "load_runs", "load_study_data"]

HELD = "heldout"
OTHER = "other"


# ---------------------------------------------------------------------------- settings
@dataclass
class StudySettings:
    """What makes two runs comparable (stored in every run file and checked on resume)."""

    max_steps: int = 300
    batch_size: int = 16
    block_size: int = 256
    eval_every: int = 25
    eval_batch_size: int = 8
    top_pct: float = 0.25
    update_every: Optional[int] = None  # the moving methods; None -> max(1, max_steps // 5)
    lora_r: int = 16
    lora_alpha: int = 32
    warmup: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    tag: str = ""  # model / data identity, filled in by the CLI

    def dynamic_every(self) -> int:
        return self.update_every if self.update_every else max(1, self.max_steps // 5)

    def signature(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


@dataclass
class Config:
    method: str  # one of METHODS
    lr: float
    seed: int = 0  # added to StudySettings.seed: the data order, the LoRA init and, for SEEDED, the selection

    @property
    def label(self) -> str:
        return f"{self.method}-s{self.seed}" if self.method in SEEDED or self.seed else self.method

    @property
    def key(self) -> str:
        return f"{self.label}_lr{self.lr:g}"


# ---------------------------------------------------------------------------- datasets
def as_dataset(d):
    return BlockDataset(d) if isinstance(d, torch.Tensor) else d


# ---------------------------------------------------------------------------- one config
def atomic_json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _training_args(out_dir: str, cfg: Config, settings: StudySettings):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        learning_rate=cfg.lr,
        weight_decay=settings.weight_decay,
        max_steps=settings.max_steps,
        lr_scheduler_type=settings.scheduler,
        warmup_steps=settings.warmup,
        logging_steps=max(1, min(settings.eval_every, 10)),
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=bool(settings.bf16 and cuda),
        seed=settings.seed + cfg.seed,
        data_seed=settings.seed + cfg.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def _make_progress_callback(bar):
    from transformers import TrainerCallback

    class _Bar(TrainerCallback):
        last: Dict[str, str] = {}
        # step -> (time.perf_counter(), time.process_time()) at its end, before any evaluation
        step_times: Dict[int, tuple] = {}
        eval_end_cpu: Dict[int, float] = {}

        def on_step_end(self, args, state, control, **kw):
            bar.update(1)
            self.step_times[int(state.global_step)] = (time.perf_counter(), time.process_time())

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            self.eval_end_cpu[int(state.global_step)] = time.process_time()  # the last eval set's end
            # called once per eval dataset; keep the latest value of each
            for name in (HELD, OTHER):
                if metrics and f"eval_{name}_loss" in metrics:
                    self.last[name] = f"{metrics[f'eval_{name}_loss']:.3f}"
            bar.set_postfix(self.last, refresh=False)

    return _Bar()


def _trainer(model, args, train_ds, eval_sets, callbacks=()):
    from transformers import PrinterCallback, Trainer, default_data_collator

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_sets,
        data_collator=default_data_collator,
    )
    trainer.remove_callback(PrinterCallback)
    for cb in callbacks:
        trainer.add_callback(cb)
    return trainer


def evaluate_baseline(model_factory, eval_sets, settings: StudySettings, work_dir: str) -> Dict[str, float]:
    """Losses of the untouched model (step 0 of every curve)."""

    model = model_factory()
    args = _training_args(os.path.join(work_dir, "baseline"), Config("full", 1e-5), settings)
    trainer = _trainer(model, args, None, eval_sets)
    metrics = trainer.evaluate()
    out = {name: float(metrics[f"eval_{name}_loss"]) for name in eval_sets}
    del trainer, model
    return out


def run_config(
    cfg: Config,
    model_factory: Callable[[], torch.nn.Module],
    train_ds,
    eval_sets: Dict[str, object],
    settings: StudySettings,
    work_dir: str,
    baseline: Optional[Dict[str, float]] = None,
    scan_cache: Optional[Dict[str, dict]] = None,
    position: int = 1,
) -> dict:
    """Train one configuration with ``transformers.Trainer`` and return its record."""
    from tqdm.auto import tqdm

    scan_cache = {} if scan_cache is None else scan_cache
    torch.manual_seed(settings.seed + cfg.seed)
    model = model_factory()
    total_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model, method_callbacks, spectrum_cb = build_method(
        cfg.method, model, top_pct=settings.top_pct, update_every=settings.dynamic_every(), seed=cfg.seed,
        lora_r=settings.lora_r, lora_alpha=settings.lora_alpha, scan_cache=scan_cache)

    bar = tqdm(total=settings.max_steps, desc=f"{cfg.key:>28}", unit="step", position=position, leave=False,
               dynamic_ncols=True)
    progress = _make_progress_callback(bar)
    progress.step_times, progress.eval_end_cpu = {}, {}
    callbacks = [progress, *method_callbacks]
    args = _training_args(os.path.join(work_dir, "trainer", cfg.key), cfg, settings)
    trainer = _trainer(model, args, train_ds, eval_sets, callbacks)
    mem = PeakMemory()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with mem:
            trainer.train()
            wall = time.perf_counter() - t0
            hist = trainer.state.log_history
            evaluated = {h["step"] for h in hist if f"eval_{HELD}_loss" in h}
            if settings.max_steps not in evaluated:
                trainer.evaluate()
                hist = trainer.state.log_history
    finally:
        bar.close()

    eval_seconds = sum(float(v) for h in hist for k, v in h.items() if k.startswith("eval_") and k.endswith("_runtime"))
    steps, held, other = [], [], []
    by_step: Dict[int, dict] = {}
    for h in hist:
        for k, v in h.items():
            if k.startswith("eval_") and k.endswith("_loss"):
                by_step.setdefault(int(h["step"]), {})[k[len("eval_"):-len("_loss")]] = float(v)
    if baseline is not None:
        by_step.setdefault(0, {}).update(baseline)
    for s in sorted(by_step):
        steps.append(s)
        held.append(by_step[s].get(HELD, float("nan")))
        other.append(by_step[s].get(OTHER, float("nan")))
    train_loss = [[int(h["step"]), float(h["loss"])] for h in hist if "loss" in h]
    # wall and CPU seconds of training (evaluations excluded) from the start of train() to the end
    # of each evaluated step; CPU time is what a process got of the machine, so it does not
    # depend on what else ran beside it
    eval_wall: Dict[int, float] = {}
    for h in hist:
        for k, v in h.items():
            if k.startswith("eval_") and k.endswith("_runtime"):
                eval_wall[int(h["step"])] = eval_wall.get(int(h["step"]), 0.0) + float(v)
    eval_cpu = {e: end - progress.step_times[e][1] for e, end in progress.eval_end_cpu.items()
                if e in progress.step_times}
    train_elapsed, train_cpu = [], []
    for s in steps:
        wall, cpu = progress.step_times.get(s, (t0, c0))
        train_elapsed.append(max(0.0, wall - t0 - sum(v for e, v in eval_wall.items() if e < s)))
        train_cpu.append(max(0.0, cpu - c0 - sum(v for e, v in eval_cpu.items() if e < s)))
    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad)
    record = {
        "key": cfg.key,
        "method": cfg.method,
        "label": cfg.label,
        "seed": cfg.seed,
        "lr": cfg.lr,
        "signature": settings.signature(),
        "settings": asdict(settings),
        "steps": steps,
        HELD: held,
        OTHER: other,
        "train_loss": train_loss,
        "train_elapsed": train_elapsed,
        "train_cpu_elapsed": train_cpu,
        "trainable_params": int(trainable),
        "grad_bytes": int(sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                              if p.requires_grad)),
        "total_params": int(total_params),
        "train_seconds": max(0.0, wall - eval_seconds),
        "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "peak_mem_mb": mem.mb,
        "mem_kind": mem.kind,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if spectrum_cb is not None:
        record["selected"] = list(spectrum_cb.selected)
        record["scans"] = sum(1 for h in spectrum_cb.history if h.get("snr"))
        # every selection after the first: how many matrices joined (as many left)
        record["switches"] = [{"step": int(h.get("step", 0)), "joined": len(h.get("joined") or ()),
                               "left": len(h.get("left") or ())} for h in spectrum_cb.history[1:]]
        # the parked host copies (bytes), the largest logged at a selection
        seen = [float(h["spectrum/parked_state_bytes"]) for h in hist if "spectrum/parked_state_bytes" in h]
        record["parked_state_bytes_max"] = max(seen) if seen else 0.0
    # the optimizer's state after the last step (elements): a selection logs it right after a
    # switch, before any joiner has taken a step, so the logged value undercounts
    tensors = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    record["optimizer_state_numel_end"] = int(sum(v.numel() for v in tensors))
    record["optimizer_state_bytes_end"] = int(sum(v.numel() * v.element_size() for v in tensors))
    del trainer, model
    return record


def load_runs(out_dir: str, keys: Optional[Sequence[str]] = None, signature: Optional[str] = None) -> List[dict]:
    """Finished run records under ``out_dir/runs`` (only ``keys`` / only ``signature`` when given)."""
    runs_dir = os.path.join(out_dir, "runs")
    out = []
    names = sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []
    for name in names:
        if not name.endswith(".json") or name == "baseline.json":
            continue
        with open(os.path.join(runs_dir, name)) as fh:
            rec = json.load(fh)
        if (keys is None or rec["key"] in keys) and (signature is None or rec.get("signature") == signature):
            out.append(rec)
    return out



# ---------------------------------------------------------------------------- data
def _texts(name: Optional[str], text_field: str, other: bool):
    from .assets import load_texts, pydoc_texts

    if other and name in ("pydoc", None):
        return pydoc_texts()
    train, held = load_texts(name, text_field=text_field)
    return train + held if other else (train, held)


def load_study_data(model: Optional[str], dataset: Optional[str], other_dataset: str, text_field: str,
                    settings: StudySettings, eval_blocks: int, max_train_blocks: Optional[int] = None):
    """``(model_factory, train blocks, {"heldout": blocks, "other": blocks})``: the model
    (default: the offline SmolLM2-135M-Instruct), its training text shuffled with seed 0, the
    held-out text and the second domain, as token blocks of ``settings.block_size``."""
    from .assets import load_model_and_tokenizer, token_blocks

    base, tok = load_model_and_tokenizer(model)
    base.config.use_cache = False
    train_texts, held_texts = _texts(dataset, text_field, other=False)
    other_texts = _texts(other_dataset, text_field, other=True)
    need = max_train_blocks or settings.max_steps * settings.batch_size
    train_texts = list(train_texts)
    random.Random(0).shuffle(train_texts)
    train = token_blocks(tok, train_texts, settings.block_size, max_blocks=need)
    held = token_blocks(tok, held_texts, settings.block_size, max_blocks=eval_blocks)
    other = token_blocks(tok, other_texts, settings.block_size, max_blocks=eval_blocks)

    def factory():
        return copy.deepcopy(base)  # base itself is never trained

    return factory, train, {HELD: held, OTHER: other}
