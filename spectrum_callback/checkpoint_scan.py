"""Scan a checkpoint folder without loading the model (:func:`scan_checkpoint`).

The streaming route builds the model's structure on the meta device from its
``config.json`` (``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``, the
class ``from_pretrained`` builds), so the candidates, their names and types are exactly
those :class:`~spectrum_callback.analyzer.SpectrumAnalyzer` finds on the loaded model.  The
analyzer then reads each matrix from the safetensors files on its own (a fused MoE bank
stored fused: one expert at a time), casts it to the solver's dtype, solves and frees it;
``chunk_mb`` bounds the copies of one solver call as in any scan, and under
``torch.distributed`` the matrices are split across ranks by cost.

The stored names must be the model's.  transformers 5 renames or fuses some checkpoints at
load time (MoE experts stored one ``Linear`` per expert become a fused bank, for instance),
so the route checks that every stored key is a key of the model's state dict (allowing the
base model's prefix, as ``from_pretrained`` does) and every candidate's weight is stored
under its own name with the model's shape; otherwise :func:`plan_stream` gives the reason and
the scan falls back to loading the model in memory (fp32 ``from_pretrained``).
"""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import __version__, _dist
from ._logging import get_logger
from .analyzer import SpectrumAnalyzer, split_by_cost
from ._safetensors_files import FLOAT_DTYPES, INDEX_FILE, Checkpoint, CheckpointError, open_checkpoint

logger = get_logger(__name__)

__all__ = ["scan_checkpoint", "plan_stream", "stream_scan", "StreamPlan", "CheckpointError",
           "default_device", "write_scan_info", "scan_info_path"]


class StreamPlan:
    """What a streaming scan reads: the meta model's analyzer and, per candidate, its stored key."""

    def __init__(self, folder: str, checkpoint: Checkpoint, analyzer, keys: Dict[str, str]):
        self.folder, self.checkpoint, self.analyzer, self.keys = folder, checkpoint, analyzer, keys


def default_device() -> torch.device:
    """This rank's GPU when there is one (``LOCAL_RANK``), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def _meta_model(folder: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        return None, config, "the checkpoint is quantized (quantization_config in config.json)"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config, None


def plan_stream(
    folder: str,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    method: str = "auto",
    dtype: Optional[torch.dtype] = None,
    chunk_mb: float = 512,
    device: Optional[torch.device | str] = None,
    cpu_threads: Optional[int] = None,
) -> Tuple[Optional[StreamPlan], Optional[str]]:
    """``(plan, None)`` when ``folder`` can be streamed, ``(None, reason)`` when it must be loaded.

    Raises :class:`CheckpointError` for a folder whose files are broken (a truncated file, a
    shard the index names but the folder lacks, no safetensors at all) and ``ValueError`` for
    bad ``include``/``exclude`` patterns.
    """
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckpointError(f"{folder}: no config.json")
    if not any(f.endswith(".safetensors") or f == INDEX_FILE for f in os.listdir(folder)):
        other = sorted(f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth")))
        if other:
            return None, f"no safetensors file, only {other[0]}"
    ckpt = open_checkpoint(folder)
    model, _, reason = _meta_model(folder)
    if model is None:
        return None, reason
    dev = torch.device(device) if device is not None else default_device()
    analyzer = SpectrumAnalyzer(model, include=include, exclude=exclude, method=method, dtype=dtype,
                                chunk_mb=chunk_mb, device=dev, skip_unchanged=False, progress=False,
                                cpu_threads=cpu_threads)
    model_keys = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    to_model = {k: k for k in ckpt.entries}
    if not all(k in model_keys for k in to_model) and prefix:
        prefixed = {k: f"{prefix}.{k}" for k in ckpt.entries}
        if all(v in model_keys for v in prefixed.values()):
            to_model = prefixed  # a base model's checkpoint read into the *ForCausalLM model
    foreign = [k for k, v in to_model.items() if v not in model_keys]
    if foreign:
        return None, (f"{len(foreign)} stored names are not the model's (e.g. {foreign[0]}); transformers "
                      "converts them at load time")
    stored = {v: k for k, v in to_model.items()}
    keys: Dict[str, str] = {}
    for name, unit in analyzer.modules.items():
        if unit.kind == "parametrized":
            return None, f"{name} is parametrized: its weight is computed, not stored"
        pname = name if unit.kind == "fused" else f"{name}.{unit.attr}"
        key = stored.get(pname)
        if key is None:
            return None, f"{pname} is not stored under its own name"
        shape, dt = ckpt.entries[key][1], ckpt.entries[key][2]
        if shape != model_keys[pname]:
            return None, f"{key} is stored with shape {list(shape)}, the model's is {list(model_keys[pname])}"
        if dt not in FLOAT_DTYPES:
            return None, f"{key} is stored as {dt}, not a float type"
        keys[name] = key
    return StreamPlan(folder, ckpt, analyzer, keys), None


def choose_route(path: str, stream: Optional[bool] = None, **scan_settings) -> Tuple[Optional[StreamPlan],
                                                                                   Optional[str]]:
    """The one choice between streaming the checkpoint ``path`` and loading it in memory:
    ``(plan, None)`` to stream, ``(None, reason)`` to load.  ``stream=None``: stream where the
    checkpoint allows it; ``True``: stream or raise :class:`CheckpointError`; ``False``: load.
    ``scan_settings`` go to :func:`plan_stream` (``include``, ``method``, ``device``, ...)."""
    if stream is False:
        return None, "stream=False"
    if not os.path.isdir(path):
        plan, reason = None, "not a local folder (a hub id?)"
    else:
        plan, reason = plan_stream(path, **scan_settings)
    if plan is None and stream:
        raise CheckpointError(f"{path}: cannot be streamed: {reason}")
    return plan, reason


def stream_scan(plan: StreamPlan, progress: bool = True) -> Tuple["OrderedDict[str, dict]", dict]:
    """Run the streaming scan of ``plan``: ``(snr, info)``; collective under ``torch.distributed``."""
    from tqdm.auto import tqdm

    an, ckpt = plan.analyzer, plan.checkpoint
    world, rank = _dist.world(), _dist.rank()
    names = list(an.modules)
    parts = split_by_cost(names, {n: an.cost(n) for n in names}, world) if world > 1 else [names]
    mine = parts[rank]  # the analyzer's own split (same inputs, same result): for the bar's total
    total = sum(ckpt.nbytes(plan.keys[n]) for n in mine)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Spectrum stream scan",
               disable=not progress or rank != 0 or not mine, leave=False)
    read = {"bytes": 0}

    def read_weight(name: str, expert: Optional[int]) -> torch.Tensor:
        key = plan.keys[name]
        w = ckpt.read(key, expert)
        n = ckpt.nbytes(key, expert)
        read["bytes"] += n
        bar.set_postfix_str(name if expert is None else f"{name}[{expert}]", refresh=False)
        bar.update(n)
        return w if w.ndim == 2 else w.reshape(1, -1)

    an.read_weight = read_weight
    t0 = time.perf_counter()
    try:
        snr = an.scan()
    finally:
        an.read_weight = None
        bar.close()
    seconds = time.perf_counter() - t0
    first = an.modules[names[0]]
    _, method, dtype = an.route(first.weight)
    info = {"route": "stream", "reason": None, "method": method, "dtype": str(dtype).replace("torch.", ""),
            "device": str(an.device), "ranks": world, "seconds": round(seconds, 3), "matrices": len(names),
            "bytes_read_rank0": read["bytes"] if rank == 0 else None, "checkpoint_files": len(ckpt.files)}
    return snr, info


def memory_scan(model, include=None, exclude=None, method="auto", dtype=None, chunk_mb=512, device=None,
                progress=True, cpu_threads=None) -> Tuple["OrderedDict[str, dict]", dict]:
    """The in-memory route over a loaded ``model``: ``(snr, info)``."""
    an = SpectrumAnalyzer(model, include=include, exclude=exclude, method=method, dtype=dtype, chunk_mb=chunk_mb,
                          device=device, progress=progress, cpu_threads=cpu_threads)
    t0 = time.perf_counter()
    snr = an.scan()
    seconds = time.perf_counter() - t0
    first = next(iter(an.modules.values()))
    dev, method, dtype = an.route(first.weight)
    return snr, {"route": "memory", "reason": None, "method": method, "dtype": str(dtype).replace("torch.", ""),
                 "device": str(dev), "ranks": _dist.world(), "seconds": round(seconds, 3), "matrices": len(snr)}


def scan_checkpoint(
    path: str,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    method: str = "auto",
    dtype: Optional[torch.dtype] = None,
    chunk_mb: float = 512,
    device: Optional[torch.device | str] = None,
    progress: bool = True,
    cpu_threads: Optional[int] = None,
    stream: Optional[bool] = None,
    info: Optional[dict] = None,
) -> "OrderedDict[str, dict]":
    """SNR of every candidate of the checkpoint in folder ``path``, as ``SpectrumAnalyzer(model).scan()``
    gives it for the loaded model: ``{name: {"snr", "type"[, "experts"]}}``.

    Args:
        path: a local folder with ``config.json`` and safetensors (one file, or shards with
            ``model.safetensors.index.json``); anything else ``from_pretrained`` takes (a hub
            id) is loaded in memory.
        include / exclude / method / dtype / chunk_mb / cpu_threads: as for the analyzer.
        device: where to solve (default: this rank's GPU if there is one, else the CPU;
            the in-memory route defaults to the weights' device, as the analyzer does).
        progress: a tqdm bar (bytes read on the streaming route).
        stream: ``None``: stream where the checkpoint allows it, else load the model in
            memory (fp32) with a warning that says why; ``True``: stream or raise
            :class:`CheckpointError`; ``False``: load in memory.
        info: a dict filled with how the scan ran (route, reason for a fallback, method,
            dtype, device, ranks, seconds).

    Under ``torch.distributed`` every rank must call it; every rank returns the same mapping.
    """
    plan, reason = choose_route(path, stream, include=include, exclude=exclude, method=method, dtype=dtype,
                                chunk_mb=chunk_mb, device=device, cpu_threads=cpu_threads)
    if plan is not None:
        snr, got = stream_scan(plan, progress=progress)
        if info is not None:
            info.update(got)
        return snr
    if stream is None:
        logger.warning("%s: scanning in memory, not streamed: %s", path, reason)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    snr, got = memory_scan(model, include, exclude, method, dtype, chunk_mb, device, progress, cpu_threads)
    got["reason"] = reason
    if info is not None:
        info.update(got)
    return snr


def scan_info_path(json_path: str) -> str:
    """The side file beside an SNR JSON: ``<results>.scan_info.json``."""
    return os.path.splitext(json_path)[0] + ".scan_info.json"


def write_scan_info(info: dict, json_path: str) -> str:
    """Write ``info`` (with the versions) beside the SNR JSON ``json_path``; returns its path."""
    import transformers

    out = dict(info, spectrum_callback=__version__, torch=torch.__version__, transformers=transformers.__version__)
    path = scan_info_path(json_path)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=2)
    return path
