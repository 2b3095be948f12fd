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
from torch.nn.utils import parametrize

from .fast_snr import snr_batched
from .snr import as_matrix
from ._logging import get_logger
from . import _dist
from ._fence.deepspeed_internals import full_ndim, full_shape, local_tensor
from ._sharded import is_dtensor, local_part, whole_on
from ._fence.torch_internals import is_fsdp1_flattened
from .config import check_chunk_mb, check_dtype, check_method, compile_patterns

logger = get_logger(__name__)

__all__ = ["SpectrumAnalyzer", "Candidate", "module_type", "find_candidates", "candidate_types", "task_head_params",
           "check_model_supported", "sharding_engine"]


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
    "SpectrumCallback reads each weight matrix whole and moves matrices in and out of a plain torch optimizer, "
    "a DeepSpeed ZeRO optimizer or one over FSDP2's DTensor shards; FSDP1's flat parameters allow neither. Use "
    "FSDP2: TrainingArguments(fsdp=\"full_shard\", fsdp_config={\"fsdp_version\": 2}) or fsdp_version: 2 in the "
    "accelerate config (configs/accelerate_fsdp2.yaml). For static Spectrum under FSDP1, call "
    "spectrum_freeze(model, top_pct=...) before the model is wrapped (use_orig_params=True) and leave the callback out"
)

FSDP2_LABEL = "FSDP2 (fully_shard)"


def sharding_engine(model: nn.Module) -> Optional[str]:
    """Name the engine if ``model`` (or any submodule) is sharded by FSDP / DTensor, else ``None``."""
    kinds = []
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append((FullyShardedDataParallel, "FSDP (FullyShardedDataParallel)"))
    with contextlib.suppress(ImportError):
        from torch.distributed.fsdp import FSDPModule

        kinds.append((FSDPModule, FSDP2_LABEL))
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
    or that are sharded by an engine the backends do not cover (FSDP1, DTensor without
    FSDP2, e.g. tensor parallelism alone).  FSDP2 (``fully_shard``) is covered."""
    engine = sharding_engine(model)
    if engine is not None and engine != FSDP2_LABEL:
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


class Candidate:
    """One unit of selection: what trains or freezes as a whole.

    * ``"matrix"``: a module's 2-D ``weight`` (``nn.Linear``, ``Conv1D``, MoE routers, ...);
      its parameters are the module's own (weight and bias);
    * ``"parametrized"``: a module whose ``weight`` is computed by
      ``torch.nn.utils.parametrize`` (``weight_norm``, ``orthogonal``, ...): the effective
      weight is scanned, the parametrization's original tensors train;
    * ``"fused"``: a 3-D parameter ``[E, n, m]`` holding the E experts of an MoE layer
      (transformers 5 ``mlp.experts.gate_up_proj`` / ``down_proj``); ``requires_grad``
      toggles the whole tensor, so the bank is one unit, and its SNR is the mean of the E
      per-expert SNRs (each also reported).
    """

    __slots__ = ("name", "module", "attr", "kind")

    def __init__(self, name: str, module: nn.Module, attr: str, kind: str):
        self.name, self.module, self.attr, self.kind = name, module, attr, kind

    @property
    def params(self) -> List[nn.Parameter]:
        """The parameters that train when this unit is selected (read from the module each
        time: a parameter replaced on the module is followed)."""
        own = dict(self.module.named_parameters(recurse=False))
        if self.kind == "parametrized":
            return list(self.module.parametrizations[self.attr].parameters(recurse=False)) + list(own.values())
        if self.kind == "fused":
            return [own[self.attr]] + ([own[self.attr + "_bias"]] if self.attr + "_bias" in own else [])
        return list(own.values())

    @property
    def weight(self) -> torch.Tensor:
        """The (effective) weight: a parameter, or the parametrization's output."""
        return getattr(self.module, self.attr)

    @property
    def experts(self) -> Optional[int]:
        return full_shape(self.weight)[0] if self.kind == "fused" else None

    @property
    def matrix_shape(self) -> tuple:
        """Shape of one matrix of this unit (an expert's for a fused bank)."""
        shape = full_shape(self.weight)
        return tuple(shape[1:]) if self.kind == "fused" else (tuple(shape) if len(shape) == 2 else (1, shape[0]))

    def matrices(self) -> int:
        return self.experts or 1

    def __repr__(self):
        return f"Candidate({self.name!r}, {self.kind})"


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _matrix_unit(name: str, mod: nn.Module) -> Optional[Candidate]:
    """The module's 2-D weight as a candidate (``None`` if it has none)."""
    if isinstance(mod, nn.Embedding):
        return None
    if parametrize.is_parametrized(mod, "weight"):
        if mod.weight.ndim != 2 or not list(mod.parametrizations["weight"].parameters(recurse=False)):
            return None
        return Candidate(name, mod, "weight", "parametrized")
    w = dict(mod.named_parameters(recurse=False)).get("weight")
    if w is None or full_ndim(w) != 2:
        return None
    return Candidate(name, mod, "weight", "matrix")


def _fused_units(model: nn.Module) -> "OrderedDict[str, Candidate]":
    """3-D parameters inside numbered layers (fused MoE expert banks), with their bias."""
    out: "OrderedDict[str, Candidate]" = OrderedDict()
    for pname, p in model.named_parameters():
        if full_ndim(p) != 3 or module_type(pname) is None or "." not in pname:
            continue
        owner_name, attr = pname.rsplit(".", 1)
        owner = model.get_submodule(owner_name)
        if isinstance(owner, _CONV):
            continue
        out[pname] = Candidate(pname, owner, attr, "fused")
    return out


def find_candidates(
    model: nn.Module,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
) -> "OrderedDict[str, Candidate]":
    """Candidate units, in model order (see :class:`Candidate`).

    Default: every module with a 2-D weight inside the repeated blocks (its name has a
    layer index) except embeddings (linear layers, ``Conv1D``, MoE routers), plus every
    fused 3-D expert bank there.  ``include``: regexes (``re.search`` on the module name,
    or on the parameter name of a fused bank); a 2-D weight or fused bank that matches one
    becomes a candidate.  ``exclude``: regexes removed afterwards.
    """
    inc = compile_patterns(include, "include")
    exc = compile_patterns(exclude, "exclude")
    all_names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    for p in inc:
        if not any(p.search(n) for n in all_names):
            raise ValueError(
                f"include pattern {p.pattern!r} matches no module of the model "
                f"(module names look like {all_names[len(all_names) // 2]!r}); fix or drop it"
            )
    units: "OrderedDict[str, Candidate]" = OrderedDict()
    seen = set()
    for name, mod in model.named_modules():
        unit = _matrix_unit(name, mod)
        if unit is None or id(unit.params[0]) in seen:
            continue
        seen.add(id(unit.params[0]))
        units[name] = unit
    fused = _fused_units(model)
    out: "OrderedDict[str, Candidate]" = OrderedDict()
    for name, unit in list(units.items()) + list(fused.items()):
        ok = any(p.search(name) for p in inc) if inc else module_type(name) is not None
        if ok and exc and any(p.search(name) for p in exc):
            ok = False
        if ok:
            if module_type(name) is None:
                raise ValueError(
                    f"include pattern matched {name!r}, which has no layer index to group it by; "
                    "Spectrum compares matrices of one type across layers: narrow the pattern to the repeated blocks"
                )
            out[name] = unit
    # model order: a fused bank sits where its owner module does
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return OrderedDict(sorted(out.items(), key=lambda kv: (order.get(kv[1].name if kv[1].kind != "fused"
                                                                      else kv[0].rsplit(".", 1)[0], 0),
                                                            kv[0])))


def task_head_params(model: nn.Module) -> List[str]:
    """Names of the parameters of task heads the base model does not contain.

    For a transformers ``*For...`` model: everything outside its base model
    (``model.base_model_prefix``) except the output embeddings (a causal or masked LM's
    head), e.g. ``classifier``, ``score``, ``qa_outputs``; with such a head, also the base
    model's ``pooler``.  The same parts PEFT keeps trainable (``modules_to_save``) for
    classification tasks.  Empty for a plain or language-model head model.
    """
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = {id(p) for p in out_emb.parameters()} if isinstance(out_emb, nn.Module) else set()
    in_base = {id(p) for p in base.parameters()}
    heads = [n for n, p in model.named_parameters() if id(p) not in in_base and id(p) not in skip]
    if heads:
        heads += [n for n, p in model.named_parameters() if id(p) in in_base and ".pooler." in f".{n}"]
    return heads


def stack_of(name: str) -> str:
    """The stack of numbered layers a name sits in: the path before its layer index
    (``model.layers``, ``encoder.block``, ``model.vision_tower.vision_model.encoder.layers``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return ""


def candidate_types(names: Sequence[str]) -> Dict[str, str]:
    """Type of each candidate: the name after the layer index (the original tool's rule).
    A model with more than one stack of numbered layers (vision and language, encoder and
    decoder) prefixes each type with its stack, ``<stack>:<type>``, so that stacks never share
    a top-k budget; single-stack models keep the original's type names exactly."""
    stacks = {stack_of(n) for n in names}
    if len(stacks) <= 1:
        return {n: module_type(n) for n in names}  # type: ignore[misc]
    return {n: f"{stack_of(n)}:{module_type(n)}" for n in names}


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
        # name -> Candidate (duck-types a module: .weight); the units of selection
        self.modules: "OrderedDict[str, Candidate]" = find_candidates(model, include, exclude)
        if not self.modules:
            raise ValueError(
                "no candidate weight matrices found: the model has no 2-D weight (nn.Linear, Conv1D, ...) or fused "
                "3-D expert bank inside numbered layers (or include/exclude filtered them all out). Pass "
                "include=[regex, ...] naming the modules to scan."
            )
        left_out = [n for n in _fused_units(model) if n not in self.modules]
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
        # Context factory that makes a module's weight whole on this rank (DeepSpeed ZeRO-3 sets it).
        # How to read whole weights: the backend's gather (ZeRO-3 collects partitions), given here.
        self.gather: Callable[[List[nn.Module]], contextlib.AbstractContextManager] = (
            gather if gather is not None else (lambda mods: contextlib.nullcontext()))
        self.last_scan_stats: Dict[str, float] = {}

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

    @staticmethod
    def _key(unit: Candidate):
        # storage, shape and dtype of what this rank holds of each parameter of the unit
        held = (local_part(local_tensor(p)) for p in unit.params)
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
        parts = _split_by_cost(todo, {n: self._cost(n) for n in todo}, world) if world > 1 else [todo]
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
        if sum(self._cost(n) for n in names) < _SMALL_SCAN_COST:
            return 1  # a few milliseconds of work: not worth sampling the machine's load
        return idle_cpu_threads()

    def _cost(self, name: str) -> float:
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
                dev, method, dtype = self._resolve(self.modules[items[0][0]].weight)
                item_bytes = torch.finfo(dtype).bits // 8
                n, m = shape
                k = min(n, m)
                per = (n * m + k * k + k) * item_bytes * (2 if method in ("gram", "fast") else 3)
                per_chunk = max(1, self.chunk_bytes // max(per, 1))
                for i in range(0, len(items), per_chunk):
                    chunk = items[i : i + per_chunk]
                    units = list(OrderedDict((c, self.modules[c]) for c, _ in chunk).values())
                    with torch.no_grad(), self.gather(units), _threads(threads):
                        for unit in units:  # same order on every rank (collective for DTensors)
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
