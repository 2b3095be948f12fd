"""DTensor parameters (FSDP2's ``fully_shard``), through torch's public DTensor API.

:func:`whole_on` reads a whole weight on the one rank that computes its SNR: FSDP2 shards
each parameter on its own along dim 0 (``Shard(0)`` on a 1-D mesh), so the owner gathers the
ranks' local pieces (``torch.distributed.gather``) and the other ranks only send theirs; no
rank ever holds a weight it does not scan.  Other layouts (HSDP's 2-D mesh, tensor
parallelism, a mesh smaller than the world) fall back to ``DTensor.full_tensor()``, which
every rank receives.  Both are collectives: every rank calls them in the same order.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _dist


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local_part(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``t``: the local shard of a DTensor, else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _mesh_device(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def whole_on(t: torch.Tensor, owner: int) -> Optional[torch.Tensor]:
    """The whole of ``t`` on global rank ``owner``, ``None`` on the other ranks.

    A plain tensor is already whole (every rank holds it).  For a DTensor this is a
    collective: every rank must call it, for the same tensors in the same order.
    """
    me = _dist.rank()
    if not is_dtensor(t):
        return t if me == owner else None
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim == 1 and isinstance(placements[0], Replicate):
        return t.to_local() if me == owner else None
    if (mesh.ndim == 1 and type(placements[0]) is Shard
            and mesh.mesh.tolist() == list(range(_dist.world()))):  # shard i on global rank i
        dim, world, n = placements[0].dim, mesh.size(), t.shape[placements[0].dim]
        chunk = -(-n // world)  # torch.chunk's split, which FSDP2 and DTensor use
        local = t.to_local()
        if local.device.type != mesh.device_type:  # shards offloaded to the host (CPUOffloadPolicy)
            local = local.to(_mesh_device(mesh))
        short = chunk - local.shape[dim]
        if short:
            pad_shape = list(local.shape)
            pad_shape[dim] = short
            local = torch.cat([local, local.new_zeros(pad_shape)], dim)
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(world)] if me == owner else None
        torch.distributed.gather(local, parts, dst=owner, group=mesh.get_group())
        return torch.cat(parts, dim).narrow(dim, 0, n) if me == owner else None
    full = t.full_tensor()
    return full if me == owner else None


class Parked:
    """A tensor moved to host memory, with what it takes to put it back where it was: its
    device, and for a DTensor its mesh, placements, shape and stride."""

    __slots__ = ("local", "device", "spec")

    def __init__(self, t: torch.Tensor):
        local = t.to_local() if is_dtensor(t) else t
        self.device = local.device
        self.spec = (t.device_mesh, t.placements, t.shape, t.stride()) if is_dtensor(t) else None
        self.local = local.detach().to("cpu", copy=True)

    @property
    def nbytes(self) -> int:
        return self.local.numel() * self.local.element_size()

    def restore(self) -> torch.Tensor:
        local = self.local.to(self.device)
        if self.spec is None:
            return local
        from torch.distributed.tensor import DTensor

        mesh, placements, shape, stride = self.spec
        return DTensor.from_local(local, mesh, placements, run_check=False, shape=shape, stride=stride)
