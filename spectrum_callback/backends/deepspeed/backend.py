"""DeepSpeed ZeRO (stages 1, 2 and 3) backend.

What a change of the trainable set does here
---------------------------------------------
ZeRO optimizers take the trainable parameters when they are built and keep fp32
master partitions and optimizer moments in flat per-group buffers
(``docs/guide/design.md``, "DeepSpeed inside"): a parameter frozen later would still get a
zero gradient and Adam would keep moving it.  So at every switch this backend **rebuilds the
ZeRO optimizer over the new trainable set** (:meth:`DeepSpeedBackend.rebuild`), the same
sequence at every stage; what differs per stage is behind one interface
(:class:`.stage.ZeroStage`: :mod:`.stage12`, :mod:`.stage3`), chosen once:

1. keep what *this rank* holds of the stayers' fp32 master and moments, nothing gathered.
   Each stayer's slice on a rank is the same before and after the rebuild: stage 3
   partitions each parameter on its own, and at stage 1/2 this backend gives each
   parameter a param group (so a flat partition) of its own, from the start-up
   (:mod:`.startup`) and at every rebuild.  Stage 1/2: the old Adam tensors themselves move
   into the new optimizer (no copy); stage 3: the local slices are copied, on the device
   when it has room, else in host memory.  fp32 weights stand in for an fp32 master (the
   optimizer copies one to the other after every step).  An optimizer laid out otherwise
   (the Trainer's groups, when the start-up hook did not run) has its stayers' owned
   fragments copied with their offsets;
2. give the parameters that leave their own storage (they pointed into the old
   optimizer's flat buffers), destroy the old optimizer (its gradient hooks, and at stage 3
   its module hooks) and free its fp32 partitions, moments and gradient buffers (all but
   the kept ones) before the new one allocates its own;
3. build a new torch optimizer of the same class and hyperparameters: stage 1/2 one param
   group per parameter, stage 3 one per (original group, Adam step count) "cohort", so that
   every parameter keeps its own bias-correction step exactly as plain
   ``torch.optim.AdamW`` would (a matrix that joins starts at step 0, one that stays keeps
   its count);
4. let the engine wrap it again (``DeepSpeedEngine._configure_optimizer``), the kept fp32
   masters moved in as the constructor builds each group (stage 1/2).  Then the Adam
   state of every group is set: the kept tensors, or zeros with step = the group's count;
   and the copied stayers are written back one parameter at a time;
5. re-point accelerate's optimizer wrapper (the Trainer and the lr scheduler hold that
   wrapper) and fix the lr scheduler's per-group lists (:mod:`.scheduler`).

Frozen parameters are in no group: nothing touches their bits.  Memory follows the
selection: after a switch the optimizer holds master partitions and moments of the
selected parameters only (``state_numel``).

Engine internals are fenced in :mod:`spectrum_callback._fence.deepspeed_internals`
(checked with DeepSpeed 0.19.8); what is refused is in :mod:`.support`; the layout tag
each param group carries is in :mod:`.layout`; resume (laying the optimizer out as saved
before DeepSpeed loads a checkpoint) is in :mod:`.resume`; selecting before the Trainer
builds the first optimizer, so that start-up never holds the full one, is in
:mod:`.startup`.
"""
from __future__ import annotations

import gc
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..._fence import deepspeed_internals as ds
from ..._fence.torch_internals import adam_step_tensor
from ..._logging import get_logger, warn_once
from ..._params import decay_and_no_decay, decays, local_numel, local_view, param_names, unique_params
from ..base import OptimizerBackend, SwitchResult
from ..torch_backend import unwrap_optimizer
from .layout import LAYOUT_KEY, hp_of, layout_tag, step_of
from .scheduler import ClassSchedule
from .stage import Reused, ZeroStage
from .stage3 import Stage3
from .stage12 import Stage12, one_group_per_parameter
from .support import dynamic_refusal, late_build_refusal, rebuild_blockers, refuse_unsupported

__all__ = ["DeepSpeedBackend", "LAYOUT_KEY", "one_group_per_parameter"]

logger = get_logger(__name__)

# A stayer's values while the old optimizer is replaced: (step, {state key: this rank's copy}),
# key None = the fp32 master.  Stage 3: the local slice; stage 1/2: (offset, owned fragment).
Kept = Tuple[int, Dict[Optional[str], object]]


def _nbytes(v) -> int:
    if isinstance(v, tuple):
        v = v[1]
    return v.numel() * v.element_size() if torch.is_tensor(v) else 0


def _reused_tensors(reuse: Dict[tuple, Reused]) -> List[torch.Tensor]:
    """Every tensor that moves into the new optimizer as it is: masters and Adam state."""
    return [t for st, master in reuse.values() for t in [master, *st.values()] if torch.is_tensor(t)]


def _say_full_build_once(built: int, selected: int) -> None:
    warn_once(
        logger, "deepspeed.full_build",
        "Spectrum/DeepSpeed: the ZeRO optimizer was built over %d trainable parameters before Spectrum selected %d "
        "of them (its start-up peak is that of full fine-tuning); rebuilding it over the selection. To build it "
        "over the selection only, attach SpectrumCallback before trainer.train() (Trainer(callbacks=[...]) or "
        "trainer.add_callback), or freeze before Trainer(...) with spectrum_freeze", built, selected)


def _staging_device(zero, nbytes: int) -> torch.device:
    """Where the stayers' copies wait during a switch: on the optimizer's device when it has
    room for them (with 10 % to spare; the old optimizer's buffers are freed right after),
    else in host memory."""
    flats = ds.param_groups(zero)
    dev = flats[0][2].device if flats else torch.device("cpu")
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if free < 1.1 * nbytes:
            return torch.device("cpu")
    return dev


class DeepSpeedBackend(OptimizerBackend):
    """SpectrumCallback's backend for DeepSpeed ZeRO stages 1, 2 and 3 (see the module doc)."""

    name = "deepspeed"

    def __init__(self, optimizer, model: nn.Module, trainer=None, lr_scheduler=None):
        super().__init__(optimizer, model, trainer, lr_scheduler)
        self.wrapper = optimizer
        self.zero = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.stage = ds.stage(self.zero) if optimizer is not None else 0
        self.engine = ds.find_engine_of(trainer, self.zero) if self.stage else None
        refuse_unsupported(self.wrapper, self.zero, self.stage, self.engine)
        # why this optimizer cannot be rebuilt over another selection (empty: it can)
        self.blockers = rebuild_blockers(self.zero, self.engine)
        self.per_stage: ZeroStage = Stage3() if self.stage == 3 else Stage12()
        base = ds.torch_optimizer(self.zero)
        self.base_cls = type(base)
        self.base_defaults = dict(base.defaults)
        self.base_kwargs = ds.rebuild_kwargs(base)  # what its constructor takes beside the groups
        self.schedule = ClassSchedule()
        self.rebuilds = 0
        self.last_switch: dict = {}
        self.park_state = False
        self.parked: Dict[int, Kept] = {}  # id(p) -> (step, this rank's parked values), with park_state
        # Class of a parameter = index of the torch param group it was in when the engine was
        # built; the lr scheduler's per-group lists are indexed the same way.
        layouts = [g.get(LAYOUT_KEY) for g in base.param_groups]
        if layouts and all(isinstance(x, dict) for x in layouts):
            # An optimizer this backend already laid out (a resume, or DeepSpeed loading the best
            # checkpoint at train end): its groups are (class, step) cohorts, not classes.
            self.classes = [dict(c) for c in layouts[0]["classes"]]
            self._group_class = [int(x["class"]) for x in layouts]
            # one group per parameter from the start-up (.startup) is the Trainer's own optimizer
            self.rebuilds = 0 if all(x.get("startup") for x in layouts) else 1
        else:
            self.classes = [hp_of(g) for g in base.param_groups]
            self._group_class = list(range(len(self.classes)))
        self.class_of: Dict[int, int] = {}
        for params, gi, _ in ds.param_groups(self.zero):
            for p in params:
                self.class_of[id(p)] = self._group_class[gi]

    # ------------------------------------------------------------------ analyzer
    def gather(self, modules):
        return self.per_stage.gather(modules)

    # ------------------------------------------------------------------ setup
    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool, park_state: bool = False) -> None:
        if dynamic and self.blockers:
            raise ValueError(dynamic_refusal(self.blockers, self.zero))
        self.park_state = park_state
        if self.blockers:
            return  # static: the optimizer is never rebuilt (switch() checks that it holds the selection)
        decay, no_decay = self._decay_classes()
        for _, ps in candidates.items():
            for p in ps:
                if id(p) not in self.class_of:
                    self.class_of[id(p)] = decay if decays(p) else no_decay
        self.find_scheduler()

    def _decay_classes(self) -> Tuple[int, int]:
        decay, no_decay = decay_and_no_decay([c.get("weight_decay", 0.0) for c in self.classes])
        if no_decay is None:
            # The optimizer was built over a selection without any no-decay parameter (its empty
            # group dropped): the Trainer's no-decay class, for a bias or norm that joins later.
            self.classes.append(dict(self.classes[decay], weight_decay=0.0))
            no_decay = len(self.classes) - 1
        return decay, no_decay

    def find_scheduler(self) -> None:
        """Find the lr scheduler and keep its per-group lists per class (:mod:`.scheduler`);
        called by :meth:`prepare`, and again by whoever sets ``classes`` (:mod:`.resume`)."""
        groups = ds.torch_optimizer(self.zero).param_groups
        self.schedule.find(self.lr_scheduler, self.trainer, groups, self.classes, self._group_class)

    # ------------------------------------------------------------------ switch
    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> SwitchResult:
        for p in leaving:
            p.grad = None
        old_groups = ds.param_groups(self.zero)
        old_ids = {id(p) for ps, _, _ in old_groups for p in ps}
        new_params = [p for p in unique_params(self.model) if p.requires_grad]
        if {id(p) for p in new_params} == old_ids and not joining:
            # The optimizer already holds exactly the selection (built after the start-up selection,
            # or laid out for a resume).  Create Adam's state now if it has none yet, as a rebuild does.
            if not self.blockers and self.rebuilds == 0 and not ds.moment_keys(ds.torch_optimizer(self.zero)):
                self._init_state(self.zero, [(c, 0) for c in self._group_class], [])
            return SwitchResult()
        if self.blockers:
            raise ValueError(late_build_refusal(self.blockers, self.zero, len(old_ids), len(new_params)))
        if self.rebuilds == 0:
            _say_full_build_once(len(old_ids), len(new_params))
        return self.rebuild(new_params, force_fresh={id(p) for p in joining if id(p) not in self.parked})

    def rebuild(self, new_params: List[nn.Parameter], force_fresh, layout=None) -> SwitchResult:
        """Replace the ZeRO optimizer by one over ``new_params`` (module doc, steps 1-5).

        ``force_fresh``: ids of parameters that start with fresh state even if the old
        optimizer held them.  ``layout``: ``[(class, step, params)]`` to reproduce exactly
        (resume) instead of the backend's own grouping (:meth:`_groups`).
        """
        old_zero = self.zero
        old_groups = ds.param_groups(old_zero)
        # the lr the scheduler set for the coming step
        class_lr = self.schedule.class_lrs(ds.torch_optimizer(old_zero).param_groups, self.classes, self._group_class)
        keys = ds.moment_keys(ds.torch_optimizer(old_zero))
        reuse = self.per_stage.reusable(old_zero, old_groups, new_params, force_fresh, keys) if layout is None else {}
        self.last_switch = {"kept_in_place": len(reuse), "kept_in_place_bytes": sum(
            _nbytes(t) for t in _reused_tensors(reuse) if t.ndim > 0)}
        if self.park_state and layout is None:
            self._park(old_groups, {id(p) for p in new_params}, keys)
        kept = self._read_stayers(old_groups, new_params, force_fresh | {i for k in reuse for i in k}, keys)
        for p in new_params:  # matrices that come back: their parked state goes in as a stayer's does
            if id(p) in self.parked and id(p) not in kept and (id(p),) not in reuse:
                kept[id(p)] = self.parked.pop(id(p))
        moved = {id(p) for ps, _, _ in old_groups for p in ps} | {id(p) for p in new_params}
        self._retire(old_zero, old_groups, {id(p) for p in new_params})
        # The old optimizer's fp32 partitions, moments and gradient buffers go now, before the
        # new one allocates its own: a switch then costs the stayers' copies, not two optimizers.
        # State that moves over as it is (``reuse``) stays.
        keep = _reused_tensors(reuse)
        self.last_switch["freed_bytes"] = ds.free_optimizer_memory(old_zero, keep=keep)
        del old_groups, keep
        groups = self._groups(new_params, kept, reuse, layout)
        base = self._new_torch_optimizer(groups, class_lr)
        new_zero = self._install(base, groups, keys, reuse)
        self._write_stayers(new_params, kept)
        self._repoint(old_zero, new_zero, [c for c, _, _ in groups], class_lr)
        del old_zero
        gc.collect()
        self.rebuilds += 1
        return SwitchResult(moved=moved)

    def _read_stayers(self, old_groups, new_params, force_fresh, keys) -> Dict[int, Kept]:
        """Step 1: step count, fp32 master and moments of the parameters that stay and whose
        state is not reused in place: copies of what *this rank* holds of them
        (:meth:`.stage.ZeroStage.copy_local`), nothing gathered.  Where the low-precision
        weights are fp32 they equal the master bit for bit (the optimizer copies master to
        weights after every step) and the new optimizer builds its master from them: the
        master is not copied then."""
        base = ds.torch_optimizer(self.zero)
        where = {id(p): flat for ps, _, flat in old_groups for p in ps}
        self.per_stage.link_state(self.zero, keys)
        stayers = [p for p in new_params if id(p) in where and id(p) not in force_fresh]
        staged = sum(local_numel(p) for p in stayers) * 4 * (1 + len(keys))
        dev = _staging_device(self.zero, staged)
        kept: Dict[int, Kept] = {}
        for p in stayers:
            st = ds.flat_state(base, where[id(p)])
            step = step_of(st)
            need = ([] if local_view(p).dtype == torch.float32 else [None]) + (list(keys) if step > 0 else [])
            kept[id(p)] = (step, {k: self.per_stage.copy_local(p, k, dev) for k in need})
        self.last_switch.update({"stayers": len(stayers), "staged_bytes": sum(
            _nbytes(v) for _, vals in kept.values() for v in vals.values()), "staging_device": str(dev)})
        return kept

    def _park(self, old_groups, new_ids, keys) -> None:
        """Step 1b (``park_state``): what this rank holds of each leaver's moments (and fp32
        master, where the weights are not fp32) goes to host memory, with its step count, to
        be written back as a stayer's when it rejoins."""
        base = ds.torch_optimizer(self.zero)
        self.per_stage.link_state(self.zero, keys)
        cpu = torch.device("cpu")
        for ps, _, flat in old_groups:
            step = step_of(ds.flat_state(base, flat))
            for p in ps:
                if id(p) in new_ids or step == 0:
                    continue
                need = ([] if local_view(p).dtype == torch.float32 else [None]) + list(keys)
                # DeepSpeed's local getters answer only for parameters that require grad; the
                # session froze the leaver already, so it is marked trainable for the copy
                p.requires_grad_(True)
                try:
                    self.parked[id(p)] = (step, {k: self.per_stage.copy_local(p, k, cpu) for k in need})
                finally:
                    p.requires_grad_(False)
        self.last_switch["parked_bytes"] = self.parked_bytes()

    def parked_bytes(self) -> int:
        return sum(_nbytes(v) for _, vals in self.parked.values() for v in vals.values())

    def parked_state(self) -> Dict[str, object]:
        names = param_names(self.model)
        return {names[i]: {"step": step, "values": {"master" if k is None else k: v for k, v in vals.items()}}
                for i, (step, vals) in self.parked.items()}

    def load_parked(self, parked: Dict[str, object]) -> None:
        by_name = dict(self.model.named_parameters(remove_duplicate=False))
        for name, entry in parked.items():
            vals = {None if k == "master" else k: v for k, v in entry["values"].items()}
            self.parked[id(by_name[name])] = (int(entry["step"]), vals)

    @staticmethod
    def _retire(old_zero, old_groups, new_ids) -> None:
        """Step 2: leavers get storage of their own; the old optimizer and its hooks go."""
        leavers = [p for ps, _, _ in old_groups for p in ps if id(p) not in new_ids]
        ds.release_storage(old_zero, leavers)
        ds.destroy(old_zero)
        ds.clear_flat_states(ds.torch_optimizer(old_zero))

    def _groups(self, new_params, kept, reuse, layout) -> List[Tuple[int, int, List[nn.Parameter]]]:
        """Step 3a: the new torch param groups, ``[(class, Adam step, params)]``: ``layout``, or
        grouped per stage (:meth:`.stage.ZeroStage.groups`) so that every parameter keeps its
        own bias-correction step.  A parameter no group held yet gets its decay class."""
        if layout is not None:
            return [(c, step, list(ps)) for c, step, ps in layout]
        entries = []
        for p in new_params:
            c = self.class_of.get(id(p))
            if c is None:
                decay, no_decay = self._decay_classes()
                c = self.class_of[id(p)] = decay if decays(p) else no_decay
            if (id(p),) in reuse:
                step = step_of(reuse[(id(p),)][0])
            else:
                step = kept[id(p)][0] if id(p) in kept else 0
            entries.append((c, step, p))
        return self.per_stage.groups(entries)

    def _new_torch_optimizer(self, groups, class_lr):
        """Step 3b: a torch optimizer of the original class and hyperparameters."""
        names = param_names(self.model)
        torch_groups = []
        for c, step, ps in groups:
            g = dict(self.classes[c])
            g["lr"] = class_lr[c]
            g["params"] = ps
            # Saved with the optimizer state by DeepSpeed: lets a resumed run rebuild this layout.
            g[LAYOUT_KEY] = layout_tag(c, step, [names[id(p)] for p in ps], self.classes)
            torch_groups.append(g)
        if not torch_groups:
            raise ValueError("Spectrum selected no trainable parameter; nothing for the DeepSpeed optimizer to train")
        base = self.base_cls(torch_groups, **self.base_kwargs)
        base.defaults.update(self.base_defaults)
        return base

    def _install(self, base, groups, keys, reuse):
        """Step 4a: the engine wraps it as ``deepspeed.initialize`` did, the reused masters
        moved in (:meth:`.stage.ZeroStage.configure`); Adam state of every group is created
        (zeros, ``step`` = the group's count) or moved over (``reuse``)."""
        new_zero, late = self.per_stage.configure(self.engine, base, reuse)
        self.last_switch["masters_after_build"] = late
        self.zero = new_zero
        self._init_state(new_zero, [(c, step) for c, step, _ in groups], keys, reuse)
        return new_zero

    def _init_state(self, zero, order, keys, reuse=None) -> None:
        """Adam's state for every flat partition: zeros, ``step`` = the group's count; or, for a
        group in ``reuse``, the old group's state tensors themselves."""
        base = ds.torch_optimizer(zero)
        for params, gi, flat in ds.param_groups(zero):
            key = tuple(id(p) for p in params)
            if reuse and key in reuse:
                state = reuse.pop(key)[0]
                for k, v in state.items():
                    if torch.is_tensor(v) and v.ndim > 0 and v.shape != flat.shape:
                        raise RuntimeError(f"Spectrum/DeepSpeed: a kept optimizer state ({k}) has shape "
                                           f"{tuple(v.shape)}, its new partition {tuple(flat.shape)}")
            else:
                _, step = order[gi]
                state = {"step": ds.adam_step_value(base, step, adam_step_tensor(step, base.param_groups[gi], flat))}
                for k in keys or self._default_keys(base.param_groups[gi]):
                    state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            ds.set_flat_state(base, flat, state)
        ds.link_optimizer_state(zero)

    def _write_stayers(self, new_params, kept) -> None:
        """Step 4b: the stayers' master weights and moments go into the new optimizer, one
        parameter at a time in model order, each copy freed once written
        (:meth:`.stage.ZeroStage.write_local`)."""
        for p in new_params:
            if id(p) not in kept:
                continue
            _, vals = kept.pop(id(p))
            for k in list(vals):
                self.per_stage.write_local(p, k, vals.pop(k))

    def _repoint(self, old_zero, new_zero, group_class, class_lr) -> None:
        """Step 5: accelerate's wrapper (held by the Trainer and the scheduler) and the lr
        scheduler's per-group lists follow the new optimizer."""
        if self.wrapper is not old_zero and hasattr(self.wrapper, "optimizer"):
            self.wrapper.optimizer = new_zero
        elif self.trainer is not None and getattr(self.trainer, "optimizer", None) is old_zero:
            self.trainer.optimizer = new_zero
        self._group_class = list(group_class)
        self.schedule.follow(ds.torch_optimizer(self.zero).param_groups, group_class, class_lr,
                             old_base=ds.torch_optimizer(old_zero), new_base=ds.torch_optimizer(new_zero))

    @staticmethod
    def _default_keys(group) -> List[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        if group.get("amsgrad"):
            keys.append("max_exp_avg_sq")
        return keys

    # ------------------------------------------------------------------ accounting
    def state_numel(self) -> int:
        total = 0
        base = ds.torch_optimizer(self.zero)
        for _, _, flat in ds.param_groups(self.zero):
            total += flat.numel()
            for v in ds.flat_state(base, flat).values():
                if torch.is_tensor(v) and v.ndim > 0:
                    total += v.numel()
        return total
