"""Scan the SNR of a model's candidate matrices (:class:`SpectrumAnalyzer`).

The analyzer batches same-shape matrices into one solver call, bounds the memory of
the fp32/fp64 copies it makes (``chunk_mb``), skips matrices whose weights did not
change since the last scan, and splits the work across ranks when
``torch.distributed`` is initialised (every rank ends with the same mapping; each
entry is computed by exactly one rank).  Which matrices are candidates is decided in
:mod:`spectrum_callback.candidates`.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from . import _dist
from ._cpu import idle_cpu_threads, torch_threads
from ._logging import get_logger
from ._params import local_view
from ._sharded import is_dtensor, whole_on
from .candidates import Candidate, candidate_types, check_model_supported, find_candidates, fused_units
from .config import check_chunk_mb, check_dtype, check_method
from .fast_snr import snr_batched
from .snr import as_matrix

logger = get_logger(__name__)

__all__ = ["SpectrumAnalyzer"]


class SpectrumAnalyzer:
    """Finds, groups and scans the candidate matrices of ``model``.

    Args:
        model: the model (unwrapped).
        include / exclude: regexes on module names (see :func:`~spectrum_callback.candidates.find_candidates`).
        method: ``"svd"`` (``torch.linalg.svdvals``, the original tool's route),
            ``"gram"`` (eigenvalues of the smaller Gram matrix), ``"fast"`` (fp32 Gram
            eigenvalues, checked against an error model, with float64 fallback; see
            :mod:`spectrum_callback.fast_snr`) or ``"auto"`` (= ``"fast"``, with its first
            stage in float64 on CUDA, where that is faster than float32 plus fallbacks).
        dtype: computation dtype (float32 or float64); ``None`` follows ``method``.
        chunk_mb: upper bound, in MiB, on the copies one solver call holds at once.
        device: where to compute (default: each weight's own device).
        skip_unchanged: reuse the SNR of matrices that cannot have changed since the
            last scan.  The trainer side marks what may change (:meth:`mark_dirty`, the
            callback marks every matrix it makes trainable); storage pointer, shape and
            dtype are checked as well.  Optimizers update weights in place with foreach
            or fused kernels that do not bump the tensor version counter, so the version
            counter alone cannot tell.
        progress: show a tqdm bar.
        gather: ``gather(modules)`` returns a context in which those modules' weights are
            whole (the engine backend's :meth:`~spectrum_callback.backends.base.OptimizerBackend.gather`;
            ZeRO-3 collects the partitions, collectively); default: the weights are whole.
        cpu_threads: threads for CPU solver calls.  ``None``: torch's setting, lowered to
            the cores other processes leave idle (sampled from /proc for 50 ms; this
            process's own threads don't count) and shared between the ranks of this
            machine; scans of a few milliseconds use 1 thread.  Multi-threaded LAPACK
            on busy cores is disastrous (measured on 2 busy cores: 2 threads 10-25x
            slower than 1).
    """

    def __init__(
        self,
        model: nn.Module,
        include: Optional[Sequence[str]] = None,
        exclude: Optional[Sequence[str]] = None,
        method: str = "auto",
        dtype: Optional[torch.dtype] = None,
        chunk_mb: float = 512,
        device: Optional[torch.device | str] = None,
        skip_unchanged: bool = True,
        progress: bool = True,
        cpu_threads: Optional[int] = None,
        gather: Optional[Callable[[List[nn.Module]], contextlib.AbstractContextManager]] = None,
    ):
        check_method(method)
        dtype = check_dtype(dtype)
        chunk_mb = check_chunk_mb(chunk_mb)
        check_model_supported(model)
        self.model = model
        self.method = method
        self.dtype = dtype
        self.chunk_bytes = int(chunk_mb * 2**20)
        self.device = torch.device(device) if device is not None else None
        self.skip_unchanged = skip_unchanged
        self.progress = progress
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or cpu_threads < 1):
            raise ValueError(f"cpu_threads={cpu_threads!r} must be None (automatic) or an integer >= 1")
        self.cpu_threads = cpu_threads
        # name -> Candidate (duck-types a module: .weight); the units of selection
        self.modules: "OrderedDict[str, Candidate]" = find_candidates(model, include, exclude)
        if not self.modules:
            raise ValueError(
                "no candidate weight matrices found: the model has no 2-D weight (nn.Linear, Conv1D, ...) or fused "
                "3-D expert bank inside numbered layers (or include/exclude filtered them all out). Pass "
                "include=[regex, ...] naming the modules to scan."
            )
        left_out = [n for n in fused_units(model) if n not in self.modules]
        if left_out:
            warnings.warn(
                f"{len(left_out)} fused 3-D MoE expert banks (e.g. {left_out[0]}) are not candidates (include/exclude) "
                "and stay frozen",
                UserWarning,
                stacklevel=2,
            )
        self.types: Dict[str, str] = candidate_types(list(self.modules))
        self.expert_snr: Dict[str, List[float]] = {}  # fused banks: the per-expert SNRs of the last scan
        self._cache: Dict[str, tuple] = {}
        self._dirty: set = set()
        # gather(units): a context in which those units' weights are whole on this rank (the
        # backend's; DeepSpeed ZeRO-3 collects the partitions, collectively).
        self.gather: Callable[[List[nn.Module]], contextlib.AbstractContextManager] = (
            gather if gather is not None else (lambda mods: contextlib.nullcontext()))
        self.last_scan_stats: Dict[str, float] = {}
        # read_weight(name, expert): the matrix of that candidate (one expert of a fused bank),
        # read from elsewhere than the model (a checkpoint file: checkpoint_scan.py); None:
        # the model's own weights.
        self.read_weight: Optional[Callable[[str, Optional[int]], torch.Tensor]] = None

    # ------------------------------------------------------------------ helpers
    @property
    def names(self) -> List[str]:
        return list(self.modules)

    def drop(self, names: Iterable[str]) -> None:
        """Leave these candidates out (never scanned, never selected)."""
        for n in list(names):
            self.modules.pop(n, None)
            self.types.pop(n, None)
            self._cache.pop(n, None)
            self._dirty.discard(n)

    def params_of(self, name: str) -> List[nn.Parameter]:
        """The parameters that train when candidate ``name`` is selected (its weight, or the
        parametrization's originals, and its bias)."""
        return list(self.modules[name].params)

    def route(self, w: torch.Tensor):
        """``(device, method, dtype)`` a scan of weight ``w`` runs with (``method="auto"`` and
        ``dtype=None`` resolved for its device)."""
        dev = self.device or w.device
        method = self.method
        dtype = self.dtype
        if method == "auto":
            method = "fast"
            if dtype is None and torch.device(dev).type == "cuda":
                # On a GPU the float64 eigen-solve costs little more than float32 (4096 x 4096
                # on an H200: 100 ms vs 81 ms), and about a third of float32 results fail the
                # error check and are solved again in float64: float64 from the start is faster
                # and exact (Llama-3-8B shapes on an H200: 17.8 s vs 24.3 s, docs/results/gpu.md).
                dtype = torch.float64
        if dtype is None:
            dtype = torch.float64 if method == "gram" else torch.float32
        return dev, method, dtype

    @staticmethod
    def _key(unit: Candidate):
        # storage, shape and dtype of what this rank holds of each parameter of the unit
        held = (local_view(p) for p in unit.params)
        return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in held)

    # ------------------------------------------------------------------ scan
    def scan(self, names: Optional[Sequence[str]] = None) -> "OrderedDict[str, dict]":
        """SNR of every candidate, or of ``names``.

        Matrices that cannot have changed since the last scan are not recomputed.  Under
        ``torch.distributed`` all ranks must call this together (the work is split, the
        results gathered); every rank returns the same mapping.

        Args:
            names: candidate module names (default: all).

        Returns:
            ``{name: {"snr": float, "type": str}}`` in candidate order.
        """
        t0 = time.perf_counter()
        names = list(self.modules) if names is None else list(names)
        unknown = [n for n in names if n not in self.modules]
        if unknown:
            raise ValueError(f"not candidate modules: {unknown[:5]}; see analyzer.names")
        world = _dist.world()
        todo = [n for n in names if not self._is_cached(n)]
        if world > 1:
            # Ranks may disagree on what is cached; scan the union so every entry has an owner.
            lists: List[Optional[List[str]]] = [None] * world
            torch.distributed.all_gather_object(lists, todo)
            union = set().union(*[set(x or []) for x in lists])
            todo = [n for n in names if n in union]
        parts = split_by_cost(todo, {n: self.cost(n) for n in todo}, world) if world > 1 else [todo]
        owner = {n: r for r, part in enumerate(parts) for n in part}
        results: Dict[str, tuple] = {}  # name -> (snr, per-expert SNRs or None)
        self._scan_local(todo, owner, results)
        if world > 1:
            gathered: List[Optional[Dict[str, tuple]]] = [None] * world
            torch.distributed.all_gather_object(gathered, results)
            results = {}
            for part in gathered:
                results.update(part or {})
        for n in todo:
            self._cache[n] = (self._key(self.modules[n]), results[n][0])
            if results[n][1] is not None:
                self.expert_snr[n] = results[n][1]
            self._dirty.discard(n)
        out: "OrderedDict[str, dict]" = OrderedDict()
        for n in names:
            out[n] = {"snr": float(self._cache[n][1]), "type": self.types[n]}
            if n in self.expert_snr:
                out[n]["experts"] = list(self.expert_snr[n])
        self.last_scan_stats = {
            "scan_seconds": time.perf_counter() - t0,
            "scanned": float(len(todo)),
            "reused": float(len(names) - len(todo)),
        }
        return out

    def mark_dirty(self, names: Iterable[str]) -> None:
        """Matrices that may change before the next scan (trainable ones) get re-scanned."""
        self._dirty.update(names)

    def invalidate(self) -> None:
        """Forget every cached SNR (the next scan recomputes all)."""
        self._cache.clear()
        self._dirty.clear()

    def refresh_keys(self, names: Iterable[str]) -> None:
        """The storage of these matrices moved without a change of values (an engine such as
        DeepSpeed ZeRO re-flattened its buffers): keep their cached SNR.  Matrices marked
        dirty stay dirty."""
        for n in names:
            if n in self._cache and n not in self._dirty:
                self._cache[n] = (self._key(self.modules[n]), self._cache[n][1])

    def _is_cached(self, name: str) -> bool:
        if not self.skip_unchanged or name not in self._cache or name in self._dirty:
            return False
        return self._cache[name][0] == self._key(self.modules[name])

    def _solver_threads(self, names: Sequence[str]) -> int:
        if self.cpu_threads is not None:
            return self.cpu_threads
        if sum(self.cost(n) for n in names) < _SMALL_SCAN_COST:
            return 1  # a few milliseconds of work: not worth sampling the machine's load
        return idle_cpu_threads()

    def cost(self, name: str) -> float:
        """The solver work of candidate ``name``, for splitting a scan across ranks."""
        unit = self.modules[name]
        k, big = min(unit.matrix_shape), max(unit.matrix_shape)
        return (float(k) ** 3 + float(k) ** 2 * big) * unit.matrices()

    def _scan_local(self, todo: List[str], owner: Dict[str, int], results: Dict[str, tuple]) -> None:
        """Compute the SNR of the units ``owner`` gives this rank; take part in reading the
        others (collectively, when the weights are sharded).

        The work items are matrices: one per unit, E per fused expert bank.  They are grouped
        by shape and batched in chunks bounded by ``chunk_bytes`` (so a fused bank is split
        across chunks when it must be).  All ranks walk ``todo`` in the same order so that
        collective gathers line up: the engine's ``gather`` context around each chunk
        (DeepSpeed ZeRO-3), then :func:`~spectrum_callback._sharded.whole_on` per unit, which
        brings a DTensor (FSDP2) whole to its owner only.
        """
        from tqdm.auto import tqdm

        groups: "OrderedDict[tuple, List[tuple]]" = OrderedDict()  # matrix shape -> [(name, expert)]
        for n in todo:
            unit = self.modules[n]
            for e in (range(unit.experts) if unit.kind == "fused" else [None]):
                groups.setdefault(unit.matrix_shape, []).append((n, e))
        rank = _dist.rank()
        mine = {n for n in todo if owner[n] == rank}
        threads = self._solver_threads(todo) if any(
            (self.device or self.modules[n].weight.device).type == "cpu" for n in todo[:1]) else None
        per_item: Dict[tuple, float] = {}
        whole: Dict[str, torch.Tensor] = {}  # unit -> its whole weight, on its owner
        kept: set = set()  # units gathered from DTensor shards (the same set on every rank)
        nonfinite: set = set()
        bar = tqdm(
            total=len(todo),
            desc="Spectrum SNR scan",
            unit="matrix",
            disable=not self.progress or rank != 0 or not todo,
            leave=False,
        )
        remaining = {n: self.modules[n].matrices() for n in todo}
        try:
            for shape, items in groups.items():
                dev, method, dtype = self.route(self.modules[items[0][0]].weight)
                item_bytes = torch.finfo(dtype).bits // 8
                n, m = shape
                k = min(n, m)
                per = (n * m + k * k + k) * item_bytes * (2 if method in ("gram", "fast") else 3)
                per_chunk = max(1, self.chunk_bytes // max(per, 1))
                for i in range(0, len(items), per_chunk):
                    chunk = items[i : i + per_chunk]
                    units = list(OrderedDict((c, self.modules[c]) for c, _ in chunk).values())
                    with torch.no_grad(), self.gather(units), torch_threads(threads):
                        for unit in units if self.read_weight is None else ():  # same order on every rank
                            if unit.name in kept:
                                continue
                            w = unit.weight
                            if is_dtensor(w):
                                kept.add(unit.name)  # a gathered copy: kept while its bank spans chunks
                            w = whole_on(w, owner[unit.name])
                            if w is not None:
                                whole[unit.name] = w
                        local = [(c, e) for c, e in chunk if c in mine]
                        if local:
                            mats, finite = [], []
                            for c, e in local:
                                if self.read_weight is not None:
                                    w = self.read_weight(c, e).to(dev)
                                else:
                                    w = whole[c]
                                    w = (w[e] if e is not None else as_matrix(w)).to(dev)
                                ok = bool(torch.isfinite(w).all())
                                finite.append(ok)
                                mats.append(w.to(dtype) if ok else torch.zeros(w.shape, dtype=dtype, device=dev))
                            snrs = snr_batched(torch.stack(mats), method=method, dtype=dtype)
                            for (c, e), ok, v in zip(local, finite, snrs.tolist()):
                                per_item[(c, e)] = v if ok else math.nan
                                if not ok:
                                    nonfinite.add(c)
                            del mats
                    for c, _ in chunk:
                        remaining[c] -= 1
                        if remaining[c] == 0:
                            kept.discard(c)
                            whole.pop(c, None)
                            bar.update(1)
                    for c in [c for c in whole if c not in kept]:
                        del whole[c]  # the weight itself, whole only inside the engine's gather context
        finally:
            bar.close()
        for c in todo:
            if c not in mine:
                continue
            unit = self.modules[c]
            if unit.kind == "fused":
                experts = [per_item[(c, e)] for e in range(unit.experts)]
                value = math.nan if any(math.isnan(x) for x in experts) else sum(experts) / len(experts)
            else:
                experts, value = None, per_item[(c, None)]
            if c in nonfinite:
                warnings.warn(
                    f"weight of {c} contains NaN or Inf values: its SNR is NaN and it will never be selected; "
                    "check the checkpoint or the training run that produced it",
                    RuntimeWarning,
                    stacklevel=3,
                )
            results[c] = (value, experts)


# Below this many solver "flops" (k^3 + k^2 * max side, summed), a CPU scan runs on one
# thread without sampling the load: about 1-5 ms of work.
_SMALL_SCAN_COST = 2e8


def split_by_cost(names: List[str], cost: Dict[str, float], world: int) -> List[List[str]]:
    """Greedy longest-processing-time split; deterministic for identical inputs."""
    loads = [0.0] * world
    parts: List[List[str]] = [[] for _ in range(world)]
    for n in sorted(names, key=lambda x: (-cost[x], x)):
        r = min(range(world), key=lambda i: (loads[i], i))
        parts[r].append(n)
        loads[r] += cost[n]
    return parts
