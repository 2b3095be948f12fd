"""Candidate discovery: which weight matrices of a model Spectrum scans, and how they group.

* :func:`find_candidates`: the units of selection (:class:`Candidate`), in model order;
* :func:`module_type`, :func:`stack_of`, :func:`candidate_types`: the type a candidate is
  ranked within (the name after its layer index);
* :func:`task_head_params`: task heads a ``*For...`` model adds to its base model;
* :func:`check_model_supported`, :func:`sharding_engine`: models whose weights cannot be
  scanned and trained in place are refused.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._fence.deepspeed_internals import full_ndim, full_shape
from ._fence.torch_internals import is_fsdp1_flattened
from .config import compile_patterns

__all__ = ["Candidate", "module_type", "find_candidates", "candidate_types", "stack_of", "task_head_params",
           "check_model_supported", "sharding_engine", "SHARDED_HELP", "FSDP2_LABEL"]


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


def layer_index(name: str) -> Optional[int]:
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


def fused_units(model: nn.Module) -> "OrderedDict[str, Candidate]":
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
    fused = fused_units(model)
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
