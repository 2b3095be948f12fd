"""Walk a model, find the candidate weight matrices, group them by type, scan their SNR.

The analyzer batches same-shape matrices into one solver call, bounds the memory of
the fp32/fp64 copies it makes (``chunk_mb``), skips matrices whose weights did not
change since the last scan, and splits the work across ranks when
``torch.distributed`` is initialised (every rank ends with the same mapping; each
entry is computed by exactly one rank).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .fast_snr import snr_batched
from .snr import as_matrix
from ._logging import get_logger
from . import _dist
from ._fence.deepspeed_internals import full_ndim, full_shape, local_tensor
from ._fence.torch_internals import is_fsdp1_flattened
from .config import check_chunk_mb, check_dtype, check_method, compile_patterns

logger = get_logger(__name__)

__all__ = ["SpectrumAnalyzer", "module_type", "find_candidates", "check_model_supported", "sharding_engine"]


def module_type(name: str) -> Optional[str]:
    """The module path after the layer index (the first all-digit component).

    ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``; ``None`` when the name
    has no layer index.  Same rule as the original tool, so MoE experts give
    ``block_sparse_moe.experts.3.w1``.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            rest = parts[i + 1 :]
            return ".".join(rest) if rest else None
    return None


def _layer_index(name: str) -> Optional[int]:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _linear_types() -> tuple:
    types: List[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except Exception:  # pragma: no cover - transformers is a hard dependency
        pass
    return tuple(types)


SHARDED_HELP = (
    "SpectrumCallback reads each weight matrix whole and moves matrices in and out of a plain torch or "
    "DeepSpeed ZeRO optimizer; it does neither for FSDP's sharded parameters. For static Spectrum under FSDP, "
    "call spectrum_freeze(model, top_pct=...) on the model before it is wrapped (before Trainer(...); FSDP1 "
    "needs use_orig_params=True) and leave the callback out. For dynamic Spectrum on several GPUs use "
    "DDP or DeepSpeed ZeRO-1/2/3 (configs/ds_zero3.json)"
)


def sharding_engine(model: nn.Module) -> Optional[str]:
    """Name the engine if ``model`` (or any submodule) is sharded by FSDP / DTensor, else ``None``."""
    kinds = []
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append((FullyShardedDataParallel, "FSDP (FullyShardedDataParallel)"))
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        kinds.append((FSDPModule, "FSDP2 (fully_shard)"))
    for mod in model.modules():
        for cls, label in kinds:
            if isinstance(mod, cls):
                return label
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        DTensor = ()
    for p in model.parameters():
        # The inner module of a root-only FSDP1 wrap holds no FSDP object, but FSDP marks the
        # parameters it flattened (a private attribute: spectrum_callback._fence).
        if is_fsdp1_flattened(p):
            return "FSDP (FullyShardedDataParallel)"
        if isinstance(p, DTensor):
            return "DTensor (tensor parallelism or a device mesh)"
    return None


def check_model_supported(model: nn.Module) -> None:
    """Refuse models whose weights cannot be trained in place (quantized, PEFT-wrapped)
    or that are sharded by an engine the backends do not cover (FSDP, DTensor)."""
    engine = sharding_engine(model)
    if engine is not None:
        raise ValueError(f"the model's parameters are distributed by {engine}: {SHARDED_HELP}")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", "quantized")
        raise ValueError(
            f"the model's weights are {method} (hf_quantizer is set): Spectrum trains the base weights "
            "themselves, which quantized weights cannot be. Load the model in bf16/fp32 "
            "(for a GGUF file, rebuild a plain model from its dequantized state dict), or use LoRA/QLoRA instead"
        )
    if hasattr(model, "peft_config") and hasattr(model, "base_model"):
        raise ValueError(
            "the model is wrapped by PEFT: Spectrum selects which base weight matrices to train and does not "
            "combine with adapters. Pass the base model (model.get_base_model() after merging, or a model "
            "loaded without PEFT), or use PEFT alone"
        )


def find_candidates(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> "OrderedDict[str, nn.Module]":
    """Candidate modules, in model order.

    Default: every ``nn.Linear`` / ``Conv1D`` with a 2-D weight inside the repeated
    blocks (its name has a layer index).  ``include``: regexes (``re.search`` on the
    module name); any module with a 2-D ``weight`` that matches one becomes a
    candidate.  ``exclude``: regexes removed afterwards.
    """
    inc = compile_patterns(include, "include")
    exc = compile_patterns(exclude, "exclude")
    linear = _linear_types()
    out: "OrderedDict[str, nn.Module]" = OrderedDict()
    seen = set()
    all_names = [n for n, _ in model.named_modules()]
    for p in inc:
        if not any(p.search(n) for n in all_names):
            raise ValueError(
                f"include pattern {p.pattern!r} matches no module of the model "
                f"(module names look like {all_names[-1]!r}); fix or drop it"
            )
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) in seen:
            continue
        if inc:
            ok = any(p.search(name) for p in inc) and full_ndim(w) == 2
        else:
            ok = isinstance(mod, linear) and full_ndim(w) == 2 and module_type(name) is not None
        if ok and exc and any(p.search(name) for p in exc):
            ok = False
        if ok:
            if module_type(name) is None:
                raise ValueError(
                    f"include pattern matched {name!r}, which has no layer index to group it by; "
                    "Spectrum compares matrices of one type across layers: narrow the pattern to the repeated blocks"
                )
            out[name] = mod
            seen.add(id(w))
    return out


def _fused_expert_params(model: nn.Module) -> List[str]:
    names = []
    for name, p in model.named_parameters():
        if p.ndim == 3 and module_type(name) is not None and "expert" in name:
            names.append(name)
    return names


class SpectrumAnalyzer:
    """Finds, groups and scans the candidate matrices of ``model``.

    Args:
        model: the model (unwrapped).
        include / exclude: regexes on module names (see :func:`find_candidates`).
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
        self.modules = find_candidates(model, include, exclude)
        if not self.modules:
            fused = _fused_expert_params(model)
            hint = ""
            if fused:
                hint = (
                    f" The model stores its MoE experts as fused 3-D tensors (e.g. {fused[0]}): "
                    "Spectrum selects 2-D matrices and does not split fused experts; pass include=[...] "
                    "for the attention projections, or load a checkpoint with per-expert Linear modules."
                )
            raise ValueError(
                "no candidate weight matrices found: the model has no nn.Linear/Conv1D with a 2-D weight "
                "inside numbered layers (or include/exclude filtered them all out). Pass include=[regex, ...] "
                "naming the modules to scan." + hint
            )
        fused = _fused_expert_params(model)
        if fused:
            warnings.warn(
                f"{len(fused)} fused 3-D MoE expert tensors (e.g. {fused[0]}) are not scanned and stay frozen: "
                "Spectrum's unit of selection is a 2-D matrix",
                UserWarning,
                stacklevel=2,
            )
        self.types: Dict[str, str] = {n: module_type(n) for n in self.modules}  # type: ignore[misc]
        self._cache: Dict[str, tuple] = {}
        self._dirty: set = set()
        # Context factory that makes a module's weight whole on this rank (DeepSpeed ZeRO-3 sets it).
        # How to read whole weights: the backend's gather (ZeRO-3 collects partitions), given here.
        self.gather: Callable[[List[nn.Module]], contextlib.AbstractContextManager] = (
            gather if gather is not None else (lambda mods: contextlib.nullcontext()))
        self.last_scan_stats: Dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def names(self) -> List[str]:
        return list(self.modules)

    def params_of(self, name: str) -> List[nn.Parameter]:
        """The direct parameters (weight and bias) of a candidate module."""
        return list(self.modules[name].parameters(recurse=False))

    def _resolve(self, w: torch.Tensor):
        dev = self.device or w.device
        method = self.method
        dtype = self.dtype
        if method == "auto":
            method = "fast"
            if dtype is None and torch.device(dev).type == "cuda":
                # On a GPU the float64 eigen-solve costs little more than float32 (4096 x 4096
                # on an H200: 100 ms vs 81 ms), while a third of the fp32 results failed the error
                # check and were solved again in float64: straight to float64 is faster and exact
                # (8B shapes on an H200: 17.8 s vs 24.3 s, docs/gpu.md).
                dtype = torch.float64
        if dtype is None:
            dtype = torch.float64 if method == "gram" else torch.float32
        return dev, method, dtype

    def _key(self, w: torch.Tensor):
        t = local_tensor(w)
        return (t.data_ptr(), tuple(t.shape), t.dtype)

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
        rank, world = _dist.rank(), _dist.world()
        todo = [n for n in names if not self._is_cached(n)]
        if world > 1:
            # Ranks may disagree on what is cached; scan the union so every entry has an owner.
            lists: List[Optional[List[str]]] = [None] * world
            torch.distributed.all_gather_object(lists, todo)
            union = set().union(*[set(x or []) for x in lists])
            todo = [n for n in names if n in union]
        mine = _split_by_cost(todo, {n: self._cost(n) for n in todo}, world)[rank] if world > 1 else todo
        results: Dict[str, float] = {}
        self._scan_local(todo, set(mine), results)
        if world > 1:
            gathered: List[Optional[Dict[str, float]]] = [None] * world
            torch.distributed.all_gather_object(gathered, results)
            results = {}
            for part in gathered:
                results.update(part or {})
        for n in todo:
            w = self.modules[n].weight
            self._cache[n] = (self._key(w), results[n])
            self._dirty.discard(n)
        out: "OrderedDict[str, dict]" = OrderedDict()
        for n in names:
            out[n] = {"snr": float(self._cache[n][1]), "type": self.types[n]}
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
                self._cache[n] = (self._key(self.modules[n].weight), self._cache[n][1])

    def _is_cached(self, name: str) -> bool:
        if not self.skip_unchanged or name not in self._cache or name in self._dirty:
            return False
        return self._cache[name][0] == self._key(self.modules[name].weight)

    def _solver_threads(self, names: Sequence[str]) -> int:
        if self.cpu_threads is not None:
            return self.cpu_threads
        if sum(self._cost(n) for n in names) < _SMALL_SCAN_COST:
            return 1  # a few milliseconds of work: not worth sampling the machine's load
        return idle_cpu_threads()

    def _cost(self, name: str) -> float:
        shape = full_shape(self.modules[name].weight)
        k, big = min(shape), max(shape)
        return float(k) ** 3 + float(k) ** 2 * big

    def _scan_local(self, todo: List[str], mine: set, results: Dict[str, float]) -> None:
        """Compute SNR for ``mine``; gather (collectively) every module in ``todo``.

        Matrices are grouped by shape and batched in chunks bounded by ``chunk_bytes``.
        All ranks walk ``todo`` in the same order so that collective gathers line up.
        """
        from tqdm.auto import tqdm

        groups: "OrderedDict[tuple, List[str]]" = OrderedDict()
        for n in todo:
            groups.setdefault(tuple(full_shape(self.modules[n].weight)), []).append(n)
        rank = _dist.rank()
        threads = self._solver_threads(todo) if any(
            (self.device or self.modules[n].weight.device).type == "cpu" for n in todo[:1]) else None
        bar = tqdm(
            total=len(todo),
            desc="Spectrum SNR scan",
            unit="matrix",
            disable=not self.progress or rank != 0 or not todo,
            leave=False,
        )
        try:
            for shape, members in groups.items():
                w0 = self.modules[members[0]].weight
                dev, method, dtype = self._resolve(w0)
                item = torch.finfo(dtype).bits // 8
                n, m = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
                k = min(n, m)
                per = (n * m + k * k + k) * item * (2 if method in ("gram", "fast") else 3)
                per_chunk = max(1, self.chunk_bytes // max(per, 1))
                for i in range(0, len(members), per_chunk):
                    chunk = members[i : i + per_chunk]
                    mods = [self.modules[c] for c in chunk]
                    with torch.no_grad(), self.gather(mods), _threads(threads):
                        local = [c for c in chunk if c in mine]
                        if local:
                            mats = []
                            finite = []
                            for c in local:
                                w = as_matrix(self.modules[c].weight).to(dev)
                                ok = bool(torch.isfinite(w).all())
                                finite.append(ok)
                                mats.append(w.to(dtype) if ok else torch.zeros(w.shape, dtype=dtype, device=dev))
                            snrs = snr_batched(torch.stack(mats), method=method, dtype=dtype)
                            for c, ok, v in zip(local, finite, snrs.tolist()):
                                if not ok:
                                    warnings.warn(
                                        f"weight of {c} contains NaN or Inf values: its SNR is NaN and it will "
                                        "never be selected; check the checkpoint or the training run that produced it",
                                        RuntimeWarning,
                                        stacklevel=3,
                                    )
                                    v = math.nan
                                results[c] = v
                            del mats
                    bar.update(len(chunk))
        finally:
            bar.close()


# Below this many solver "flops" (k^3 + k^2 * max side, summed), a CPU scan runs on one
# thread without sampling the load: about 1-5 ms of work.
_SMALL_SCAN_COST = 2e8


def _cpu_jiffies():
    """(busy jiffies of the whole machine, jiffies of this process, all jiffies) from /proc."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    busy = sum(fields[:3]) + sum(fields[5:8])
    with open("/proc/self/stat") as fh:
        own = fh.read().rsplit(")", 1)[1].split()
    mine = int(own[11]) + int(own[12])  # utime + stime, all threads of this process
    return busy, mine, sum(fields[:8])


def busy_cores_of_other_processes(window_s: float = 0.05) -> Optional[float]:
    """Cores that other processes keep busy now, sampled over ``window_s`` from /proc
    (Linux); ``None`` where /proc cannot be read.  This process's own threads (the
    Trainer's, paused while the callback scans) do not count."""
    try:
        b0, m0, t0 = _cpu_jiffies()
        time.sleep(window_s)
        b1, m1, t1 = _cpu_jiffies()
    except (OSError, ValueError, IndexError):
        return None
    if t1 <= t0:
        return None
    cores = os.cpu_count() or 1
    return max(0.0, (b1 - b0) - (m1 - m0)) / (t1 - t0) * cores


def idle_cpu_threads(max_threads: Optional[int] = None) -> int:
    """Threads worth using on this machine now: torch's setting (or ``max_threads``),
    lowered to the cores other processes leave idle and shared between the ranks of
    this machine.  At least 1.

    OpenMP threads on cores that another process keeps busy make LAPACK 10-25x slower,
    so this matters on shared machines.  "Busy" is sampled from /proc for 50 ms,
    leaving out this process's own threads. Where /proc is unavailable, the 1-minute
    load average stands in, with this process counted as one busy core."""
    n = max_threads or torch.get_num_threads()
    cores = os.cpu_count() or n
    others = busy_cores_of_other_processes()
    if others is None:
        try:
            others = max(os.getloadavg()[0] - 1.0, 0.0)
        except (AttributeError, OSError):  # pragma: no cover - not on every platform
            others = 0.0
    idle = int(cores - others + 0.5)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(n, idle, cores // max(local, 1)))


@contextlib.contextmanager
def _threads(n: Optional[int]):
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _split_by_cost(names: List[str], cost: Dict[str, float], world: int) -> List[List[str]]:
    """Greedy longest-processing-time split; deterministic for identical inputs."""
    loads = [0.0] * world
    parts: List[List[str]] = [[] for _ in range(world)]
    for n in sorted(names, key=lambda x: (-cost[x], x)):
        r = min(range(world), key=lambda i: (loads[i], i))
        parts[r].append(n)
        loads[r] += cost[n]
    return parts
