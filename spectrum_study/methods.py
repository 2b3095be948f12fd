"""The fine-tuning methods the study, the demo and the benchmarks compare, built in one
place, and the one memory probe they share.

    model, callbacks, spectrum = build_method("spectrum", model, top_pct=0.25)
    trainer = Trainer(model=model, ..., callbacks=callbacks)
    with PeakMemory() as mem:
        trainer.train()
    mem.peak_bytes

Methods (:data:`METHODS`):

* ``full``: every parameter trains;
* ``spectrum``: ``SpectrumCallback(top_pct)``, one scan (static);
* ``spectrum-dynamic``: ``SpectrumCallback(top_pct, update_every=N)`` (policy ``"scan"``);
* ``spectrum-rotate``: policy ``"rotate"``: the active ``top_pct`` moves through the top
  ``2 * top_pct`` by SNR every N steps;
* ``lisa``: policy ``"random"``: a fresh random ``top_pct`` per type every N steps (``seed``);
* ``cyclic``: policy ``"cyclic"``: the next window of layers per type every N steps (BAdam's
  order);
* ``spectrum-rotate-park``, ``lisa-park``, ``cyclic-park``: the same with ``park_state=True``
  (a leaver's optimizer state waits in host memory for its return);
* ``random``: ``top_pct`` per type at random (``seed``), through ``snr_json``;
* ``bottom``: the lowest ``top_pct`` per type by SNR (negated SNRs through ``snr_json``);
* ``lora``: peft LoRA on all linear layers (``lora_r``, ``lora_alpha``);
* ``lora-spectrum``: LoRA on Spectrum's top ``top_pct`` per type
  (:func:`~spectrum_callback.spectrum_lora_targets`), at the rank that gives as many
  trainable parameters as ``lora`` (the alpha / rank ratio kept);
* ``lora-random``: LoRA on a random ``top_pct`` per type (``seed``), at that same rank.
"""
from __future__ import annotations

import math
import os
import random
import threading
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["METHODS", "MOVING", "SEEDED", "LORA", "BEST_LR", "build_method", "selection_snr", "lora_targets",
           "PeakMemory"]

METHODS = ("full", "spectrum", "spectrum-dynamic", "spectrum-rotate", "spectrum-rotate-park", "lisa", "lisa-park",
           "cyclic", "cyclic-park", "random", "bottom", "lora", "lora-spectrum", "lora-random")
LORA = ("lora", "lora-spectrum", "lora-random")
# method -> (policy, park_state) for the methods whose selection changes every update_every steps
MOVING = {
    "spectrum-dynamic": ("scan", False),
    "spectrum-rotate": ("rotate", False),
    "spectrum-rotate-park": ("rotate", True),
    "lisa": ("random", False),
    "lisa-park": ("random", True),
    "cyclic": ("cyclic", False),
    "cyclic-park": ("cyclic", True),
}
# Each method's best learning rate in the CPU study (SmolLM2-135M, KJV, 200 steps of 4 x 128
# tokens; docs/results/study_cpu): what the demo and the benchmarks give each method, so that
# no method is compared at another's rate.
BEST_LR = {"full": 5e-5, "spectrum": 1.5e-4, "lora": 5e-4}
# the methods whose selection depends on a seed (one configuration per seed in the study)
SEEDED = ("random", "lisa", "lisa-park", "lora-random")


def selection_snr(method: str, model, seed: int = 0, scan_cache: Optional[Dict[str, dict]] = None):
    """``snr_json`` mapping that makes ``SpectrumCallback`` pick the ``random`` or ``bottom``
    selection; ``None`` for the methods that scan."""
    from spectrum_callback import SpectrumAnalyzer

    if method in ("random", "lora-random"):
        an = SpectrumAnalyzer(model, progress=False)
        rng = random.Random(1000 + seed)
        return {n: {"snr": rng.random(), "type": an.types[n]} for n in an.names}
    if method == "bottom":
        cache = {} if scan_cache is None else scan_cache
        if "snr" not in cache:
            cache["snr"] = {n: dict(i) for n, i in SpectrumAnalyzer(model, progress=False).scan().items()}
        out = {}
        for n, i in cache["snr"].items():
            v = float(i["snr"])
            out[n] = {"snr": -v if math.isfinite(v) else float("nan"), "type": i["type"]}
        return out
    return None


def build_method(
    method: str,
    model,
    *,
    top_pct: float = 0.25,
    update_every: Optional[int] = None,
    seed: int = 0,
    lora_r: int = 16,
    lora_alpha: int = 32,
    scan_cache: Optional[Dict[str, dict]] = None,
    plot_dir: Optional[str] = None,
    verbose: bool = False,
) -> Tuple[torch.nn.Module, List[object], Optional[object]]:
    """``(model, callbacks, spectrum_callback)`` for ``method``.

    The model comes back wrapped for ``lora`` and unchanged otherwise; ``callbacks`` go to
    the Trainer; ``spectrum_callback`` is the ``SpectrumCallback`` (``None`` for ``full``
    and ``lora``).  ``update_every`` is required for the methods of :data:`MOVING`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "full":
        return model, [], None
    if method in LORA:
        return _lora(method, model, top_pct, seed, lora_r, lora_alpha), [], None
    from spectrum_callback import SpectrumCallback

    policy, park = MOVING.get(method, ("scan", False))
    if method in MOVING and not update_every:
        raise ValueError(f"{method} needs update_every (a new selection every N optimizer steps)")
    cb = SpectrumCallback(
        top_pct=top_pct,
        update_every=update_every if method in MOVING else None,
        snr_json=selection_snr(method, model, seed, scan_cache),
        policy=policy,
        park_state=park,
        seed=seed,
        plot_dir=plot_dir,
        verbose=verbose,
    )
    return model, [cb], cb


def lora_targets(method: str, model, top_pct: float = 0.25, seed: int = 0) -> Optional[List[str]]:
    """The modules a LoRA method adapts: ``None`` for ``lora`` (PEFT's ``"all-linear"``),
    Spectrum's selection for ``lora-spectrum``, a seeded random one for ``lora-random``."""
    from spectrum_callback import select_top, spectrum_lora_targets

    if method == "lora":
        return None
    if method == "lora-spectrum":
        return spectrum_lora_targets(model, top_pct=top_pct)
    if method == "lora-random":
        return select_top(selection_snr("lora-random", model, seed), top_pct)
    raise ValueError(f"{method!r} is not a LoRA method ({', '.join(LORA)})")


def _all_linear(model) -> List[str]:
    """The modules PEFT's ``target_modules="all-linear"`` adapts: every ``nn.Linear`` but the
    output layer."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not out]


def _lora(method: str, model, top_pct: float, seed: int, lora_r: int, lora_alpha: int):
    """A LoRA method's PEFT model.  The placed methods get the rank that gives as many
    trainable parameters as rank ``lora_r`` on every linear layer, and the same alpha / rank."""
    from peft import LoraConfig, get_peft_model

    from spectrum_callback.preselect import lora_params, lora_rank_for_budget

    targets = lora_targets(method, model, top_pct, seed)
    if targets is None:
        r, alpha, targets = lora_r, lora_alpha, "all-linear"
    else:
        budget = lora_params(model, _all_linear(model), lora_r)
        r = lora_rank_for_budget(model, targets, budget)
        alpha = lora_alpha * r / lora_r
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


class PeakMemory:
    """Peak memory of a block of work, the one probe of the study, the demo and the benchmarks.

    * device: ``torch.cuda.max_memory_allocated`` (reset on entry), when ``cuda``;
    * host: the resident set size, sampled every ``interval_s`` from ``/proc/self/statm``
      (psutil elsewhere) while ``sample_rss`` (off where a sampling thread would disturb a
      timing); :meth:`process_peak_rss` is the process's lifetime peak (``ru_maxrss``).

    ``peak_bytes`` is the device peak with ``cuda``, else the host peak; ``mb`` is the study's
    figure (device peak, or the host's rise over the value on entry).
    """

    def __init__(self, cuda: Optional[bool] = None, interval_s: float = 0.02, sample_rss: bool = True):
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.interval_s = interval_s
        self.sample_rss = sample_rss
        self._stop = threading.Event()
        self._rss_peak = 0
        self._rss_start = 0
        self._cuda_peak = 0
        self._cuda_start = 0
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except Exception:
            try:
                import psutil

                return psutil.Process().memory_info().rss
            except Exception:
                return 0

    @staticmethod
    def process_peak_rss() -> int:
        """The largest resident set size of this process so far (``ru_maxrss``), in bytes."""
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._rss_start = self._rss_peak = self.rss()
        if self.sample_rss:
            def loop():
                while not self._stop.wait(self.interval_s):
                    self._rss_peak = max(self._rss_peak, self.rss())

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self._cuda_peak = torch.cuda.max_memory_allocated()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._rss_peak = max(self._rss_peak, self.rss())

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.cuda else "cpu_rss_above_start"

    @property
    def rss_peak_bytes(self) -> int:
        return int(self._rss_peak)

    @property
    def cuda_peak_bytes(self) -> int:
        return int(self._cuda_peak)

    @property
    def peak_bytes(self) -> int:
        return self.cuda_peak_bytes if self.cuda else self.rss_peak_bytes

    @property
    def mb(self) -> float:
        """The study's figure: CUDA peak allocated, or on CPU the rise of RSS over the start."""
        return (self._cuda_peak if self.cuda else self._rss_peak - self._rss_start) / 2**20


# how the reports draw each method
COLORS = {
    "full": "tab:red",
    "spectrum": "tab:blue",
    "spectrum-dynamic": "tab:cyan",
    "spectrum-rotate": "tab:purple",
    "spectrum-rotate-park": "tab:pink",
    "lisa": "tab:orange",
    "lisa-park": "gold",
    "cyclic": "tab:olive",
    "cyclic-park": "yellowgreen",
    "random": "tab:gray",
    "bottom": "tab:brown",
    "lora": "tab:green",
    "lora-spectrum": "darkgreen",
    "lora-random": "lightgreen",
}
MARKERS = {"full": "s", "spectrum": "o", "spectrum-dynamic": "D", "spectrum-rotate": "P", "spectrum-rotate-park": "p",
            "lisa": "*", "lisa-park": "h", "cyclic": ">", "cyclic-park": "<", "random": "x", "bottom": "v", "lora": "^",
            "lora-spectrum": "8", "lora-random": "d"}
