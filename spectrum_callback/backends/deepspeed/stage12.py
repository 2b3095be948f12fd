"""ZeRO stages 1 and 2: the per-stage steps of a rebuild, and the start-up layout.

Stage 1/2 partition each param group's flattened parameters across the ranks, so a
parameter's slice on a rank depends on its whole group.  This backend gives each parameter
a param group of its own, from the start-up (:func:`one_group_per_parameter`, through
:mod:`.startup`) and at every rebuild (:meth:`Stage12.groups`): a staying parameter's group
then has the same size and ranks before and after a rebuild, and so its slice too.

* A stayer in a group of its own with Adam state keeps it in place (:meth:`Stage12.reusable`):
  the old state tensors go into the new optimizer (no copy, nothing sent between ranks),
  and so does its fp32 master where the weights are not fp32, copied into the new
  partition as DeepSpeed's constructor builds that group and freed before the next group
  allocates (:meth:`Stage12.configure`, fenced
  :func:`~spectrum_callback._fence.deepspeed_internals.each_group_built`).
* A stayer of another layout (the Trainer's groups, when the start-up split did not run)
  has the fragment this rank owns copied with its offset, and after the rebuild the whole
  tensor is reassembled from every rank's fragment, one tensor at a time (one collective
  per tensor, model order), and set with ``safe_set_full_*`` (:meth:`Stage12.write_local`).
"""
from __future__ import annotations

import contextlib

import torch

from ..._dist import is_main
from ..._fence import deepspeed_internals as ds
from ..._logging import get_logger, warn_once
from ..._params import local_view, param_names
from .layout import LAYOUT_KEY, hp_of, layout_tag
from .stage import ZeroStage

logger = get_logger(__name__)


def one_group_per_parameter(optimizer, model):
    """The Trainer's torch Adam/AdamW ``optimizer`` (no step taken yet) as one of the same
    class with one param group per parameter, hyperparameters as in its group, each group
    tagged with the layout the ZeRO-1/2 rebuilds keep (``LAYOUT_KEY``, class = index of the
    original group).  Any other optimizer is returned as it is (the backend refuses it)."""
    if optimizer.state:
        return optimizer
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and is_main():
            logger.warning(
                "Spectrum/DeepSpeed: %s is not split into one param group per parameter (only torch Adam/AdamW "
                "themselves are): each ZeRO-1/2 switch then copies the stayers' fragments this rank owns (memory up "
                "to that share) instead of keeping them in place. Use TrainingArguments(optim='adamw_torch')",
                type(optimizer).__name__)
        return optimizer
    names = param_names(model)
    if any(id(p) not in names for g in optimizer.param_groups for p in g["params"]):
        return optimizer  # it trains something outside the model: left as built
    classes = [hp_of(g) for g in optimizer.param_groups]
    groups = []
    for c, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            tag = layout_tag(c, 0, [names[id(p)]], classes, startup=True)
            groups.append(dict(classes[c], params=[p], **{LAYOUT_KEY: tag}))
    if not groups:
        return optimizer
    out = type(optimizer)(groups)
    out.defaults.update(optimizer.defaults)
    return out


def _copy_master(new: torch.Tensor, old: torch.Tensor) -> None:
    """Fill a new fp32 master partition from the old one of the same parameter, then free the
    old one's memory."""
    if new.shape != old.shape:
        raise RuntimeError(f"Spectrum/DeepSpeed: a kept fp32 master partition has shape {tuple(old.shape)}, "
                           f"its new partition {tuple(new.shape)}")
    with torch.no_grad():
        new.copy_(old)
    ds.free_storage(old)


class Stage12(ZeroStage):
    """ZeRO-1/2: one param group per parameter, state kept in place (module doc)."""

    def gather(self, modules):
        return contextlib.nullcontext()  # the weights are whole on every rank

    def reusable(self, zero, old_groups, new_params, force_fresh, keys):
        """Every old group of one staying parameter with Adam state: ``{(id(p),): (its Adam
        state, its fp32 master or None where the weights are fp32)}``."""
        base = ds.torch_optimizer(zero)
        new_ids = {id(p) for p in new_params}
        out = {}
        for ps, _, flat in old_groups:
            if len(ps) != 1 or id(ps[0]) not in new_ids or id(ps[0]) in force_fresh:
                continue
            st = dict(ds.flat_state(base, flat))
            if not st or "step" not in st or not all(k in st for k in keys):
                continue  # no Adam state yet: nothing to keep (a bf16 master goes the copying way)
            master = None if local_view(ps[0]).dtype == torch.float32 else flat
            out[(id(ps[0]),)] = (st, master)
        return out

    def link_state(self, zero, keys):
        if keys:
            # (Re)map fragments to the current state tensors: a checkpoint load replaces them.
            ds.link_optimizer_state(zero)

    def copy_local(self, p, key, dev):
        """The fragment of ``p`` this rank owns, ``(offset, copy)``."""
        frag = ds.owned_fragment(p, key)
        return None if frag is None else (frag[0], frag[1].detach().to(dev, copy=True))

    def write_local(self, p, key, value):
        """The whole tensor reassembled from every rank's fragment (collective), this rank's
        new slice taken from it (``safe_set_full_*``)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        whole = ds.reassemble(p, value, ds.device_of(p))
        if key is None:
            safe_set_full_fp32_param(p, whole)
        else:
            safe_set_full_optimizer_state(p, whole, key)

    def groups(self, entries):
        """One group per parameter: its slice on each rank does not move at later rebuilds,
        and DeepSpeed's constructor flattens one parameter at a time."""
        return [(c, step, [p]) for c, step, p in entries]

    def configure(self, engine, base, reuse):
        """Each reused master is copied into its new partition as soon as the constructor has
        built that group, the old one freed before the next group allocates: the extra
        memory is one parameter's master slice, not all of them."""
        masters = {}  # id(torch group) -> (group index, its parameter, the old master)
        for i, g in enumerate(base.param_groups):
            key = tuple(id(p) for p in g["params"])
            if key in reuse and reuse[key][1] is not None:
                masters[id(g)] = (i, g["params"][0], reuse[key][1])

        def on_built(g):
            pending = masters.get(id(g))
            if pending is None or not g["params"] or g["params"][0] is pending[1]:
                return  # not ours, or not built yet
            del masters[id(g)]
            _copy_master(g["params"][0], pending[2])

        if masters:
            with ds.each_group_built(base, on_built):
                new_zero = ds.configure_optimizer(engine, base)
        else:
            new_zero = ds.configure_optimizer(engine, base)
        late = len(masters)
        if masters:
            # The constructor did not walk its groups as the hook expects (another DeepSpeed): the
            # kept masters were all alive beside the new ones.  Copy them now, by group index.
            warn_once(logger, "deepspeed.masters_after_build",
                      "Spectrum/DeepSpeed: %d kept fp32 master partitions were copied after the ZeRO-1/2 optimizer "
                      "was built, not while DeepSpeed built each group (its constructor does not walk the param "
                      "groups as in DeepSpeed %s): a switch briefly holds those masters twice",
                      late, ds.TESTED_DEEPSPEED_STR, main_only=False)
            flat_of = {gi: flat for _, gi, flat in ds.param_groups(new_zero)}
            for i, _, old in list(masters.values()):
                _copy_master(flat_of[i], old)
            masters.clear()
        return new_zero, late
