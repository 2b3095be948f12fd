"""What Spectrum knows about optimizers beyond torch's own: their names, and which engine can
run which.

On plain PyTorch and DDP every optimizer works: a frozen parameter has no gradient (the
optimizers skip it), a leaver's state is dropped or parked whole, a joiner starts fresh.
Two engines hand optimizers something other than whole matrices, and some optimizers cannot
take that:

* FSDP2 gives the optimizer DTensor shards: bitsandbytes' kernels have no DTensor support,
  transformers' Adafactor keeps its factored moments as plain tensors (both fail without
  Spectrum too), and GaLore / APOLLO project each whole matrix's gradient.
* DeepSpeed ZeRO gives the optimizer flat 1-D partitions of many parameters: GaLore / APOLLO
  have no matrix to project.  Which ZeRO optimizers a switch can rebuild is in
  :mod:`spectrum_callback.backends.deepspeed.support`.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["optimizer_name", "engine_refusal", "projected_optim_refusal"]

_PROJECTED = ("galore_torch", "apollo_torch")


def optimizer_name(opt) -> str:
    """``module.Class`` of an optimizer, e.g. ``bitsandbytes.optim.adamw.AdamW8bit``."""
    cls = type(opt)
    return f"{cls.__module__}.{cls.__qualname__}"


def _package(opt) -> str:
    return (type(opt).__module__ or "").split(".")[0]


def engine_refusal(opt, engine: str) -> Optional[str]:
    """Why ``opt`` cannot train under ``engine`` (``"fsdp2"`` or ``"deepspeed"``), with what
    works instead; ``None`` when it can."""
    name, pkg = optimizer_name(opt), _package(opt)
    if pkg in _PROJECTED:
        where = "FSDP2's DTensor shards" if engine == "fsdp2" else "DeepSpeed ZeRO's flat 1-D partitions"
        return (f"{name} projects the gradient of each whole weight matrix (GaLore / APOLLO); under {engine} it "
                f"would get {where}, which it cannot project. Spectrum with {name} works on plain PyTorch and DDP; "
                "under DeepSpeed or FSDP2 use optim='adamw_torch' or an 8-bit AdamW")
    if engine == "fsdp2" and pkg == "bitsandbytes":
        return (f"{name} cannot step FSDP2's DTensor parameters: bitsandbytes registers no DTensor sharding for its "
                "kernels, so it fails without Spectrum too. Under FSDP2 use torchao's optim='adamw_torch_8bit'; "
                "bitsandbytes' optimizers work with Spectrum on plain PyTorch, DDP and DeepSpeed")
    if engine == "fsdp2" and name == "transformers.optimization.Adafactor":
        return (f"{name} cannot step FSDP2's DTensor parameters: it keeps its factored second moments as plain "
                "tensors and mixes them with DTensor gradients, so it fails without Spectrum too. Under FSDP2 use "
                "optim='adamw_torch' or torchao's 'adamw_torch_8bit'; Adafactor works with Spectrum on plain "
                "PyTorch, DDP and DeepSpeed")
    return None


def projected_optim_refusal(optim, engine: str) -> Optional[str]:
    """:func:`engine_refusal` for a GaLore / APOLLO ``TrainingArguments.optim`` value, before the
    optimizer exists (DeepSpeed would fail building its partitions around it first)."""
    name = str(getattr(optim, "value", optim))
    if not name.startswith(("galore", "apollo")):
        return None
    where = "FSDP2's DTensor shards" if engine == "fsdp2" else "DeepSpeed ZeRO's flat 1-D partitions"
    return (f"optim={name!r} projects the gradient of each whole weight matrix (GaLore / APOLLO); under {engine} it "
            f"would get {where}, which it cannot project. Spectrum with {name!r} works on plain PyTorch and DDP; "
            "under DeepSpeed or FSDP2 use optim='adamw_torch' or an 8-bit AdamW")
