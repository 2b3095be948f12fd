"""DeepSpeed ZeRO (stages 1, 2 and 3) backend.

What a change of the trainable set does here
---------------------------------------------
ZeRO optimizers take the trainable parameters when they are built and keep fp32
master partitions and optimizer moments in flat per-group buffers (trap 3 in
``docs/deepspeed.md``): a parameter frozen later would still get a zero gradient and
Adam would keep moving it (trap 2).  So at every switch this backend **rebuilds the
ZeRO optimizer over the new trainable set**:

1. copy what *this rank* holds of the stayers' fp32 master and moments, nothing gathered:
   at stage 3 each parameter is partitioned on its own, so its local slices
   (``deepspeed.utils.safe_get_local_*``, public) are the same in the new optimizer; at
   stage 1/2 the fragment this rank owns of the flat group, with its offset.  The copies
   stay on the device when it has room, else in host memory; fp32 weights stand in for an
   fp32 master (the optimizer copies one to the other after every step);
2. give the parameters that leave their own storage (they pointed into the old
   optimizer's flat buffers), destroy the old optimizer (its gradient hooks, and at stage 3
   its module hooks) and free its fp32 partitions, moments and gradient buffers before the
   new one allocates its own;
3. build a new torch optimizer of the same class and hyperparameters, one param group
   per (original group, Adam step count) "cohort" so that every parameter keeps its
   own bias-correction step exactly as plain ``torch.optim.AdamW`` would (a matrix that
   joins starts at step 0, one that stays keeps its count);
4. let the engine wrap it again (``DeepSpeedEngine._configure_optimizer``), create the
   Adam state of every group (zeros, step = the cohort's count) and write the stayers'
   copies back, one parameter at a time: stage 3 its local slices
   (``safe_set_local_*``); stage 1/2 the whole tensor reassembled from every rank's
   fragment (one collective per tensor, model order) and set with ``safe_set_full_*``;
5. re-point accelerate's optimizer wrapper (the Trainer and the lr scheduler hold that
   wrapper) and fix the lr scheduler's per-group lists (trap 6).

Frozen parameters are in no group: nothing touches their bits.  Memory follows the
selection: after a switch the optimizer holds master partitions and moments of the
selected parameters only (``state_numel``).

Engine internals are fenced in :mod:`spectrum_callback._fence.deepspeed_internals`
(checked with DeepSpeed 0.19.8); resume (laying the optimizer out as saved before
DeepSpeed loads a checkpoint) is in :mod:`.resume`; selecting before the Trainer builds the
first optimizer, so that start-up never holds the full one, is in :mod:`.startup`.
"""
from __future__ import annotations

import gc
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..._fence import deepspeed_internals as ds
from ..._fence.torch_internals import adam_step_tensor, set_scheduler_last_lr
from ..._logging import get_logger
from ..base import OptimizerBackend, SwitchResult
from ..torch_backend import unwrap_optimizer

logger = get_logger(__name__)

# Stored in each torch param group of a rebuilt optimizer (and so in DeepSpeed's checkpoint):
# the class, the step cohort and the parameter names, which let a resumed run rebuild the
# same layout before DeepSpeed loads the checkpoint (see .resume).
LAYOUT_KEY = "spectrum_layout"

# A stayer's values while the old optimizer is replaced: (step, {state key: this rank's copy}),
# key None = the fp32 master.  Stage 3: the local slice; stage 1/2: (offset, owned fragment).
Kept = Tuple[int, Dict[Optional[str], object]]


def _nbytes(v) -> int:
    if isinstance(v, tuple):
        v = v[1]
    return v.numel() * v.element_size() if torch.is_tensor(v) else 0


_said_full_build = False


def _say_full_build_once(built: int, selected: int) -> None:
    global _said_full_build
    if _said_full_build:
        return
    _said_full_build = True
    from ..._dist import is_main

    if is_main():
        logger.warning(
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


def _hp_of(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", LAYOUT_KEY) and not str(k).startswith("_ds")}


def _scalar(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _param_names(model) -> Dict[int, str]:
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


class DeepSpeedBackend(OptimizerBackend):
    """SpectrumCallback's backend for DeepSpeed ZeRO stages 1, 2 and 3 (see the module doc)."""

    name = "deepspeed"

    def __init__(self, optimizer, model: nn.Module, trainer=None, lr_scheduler=None):
        super().__init__(optimizer, model, trainer, lr_scheduler)
        self.wrapper = optimizer
        self.zero = unwrap_optimizer(optimizer) if optimizer is not None else None
        self.stage = ds.stage(self.zero) if optimizer is not None else 0
        self.engine = ds.find_engine_of(trainer, self.zero) if self.stage else None
        self._refuse_unsupported()
        base = ds.torch_optimizer(self.zero)
        self.base_cls = type(base)
        self.base_defaults = dict(base.defaults)
        self.sched = None
        self.sched_base: Optional[Tuple[list, list]] = None
        self.rebuilds = 0
        self.last_switch: dict = {}
        # Class of a parameter = index of the torch param group it was in when the engine was
        # built; the lr scheduler's per-group lists are indexed the same way.
        layouts = [g.get(LAYOUT_KEY) for g in base.param_groups]
        if layouts and all(isinstance(x, dict) for x in layouts):
            # An optimizer this backend already laid out (a resume, or DeepSpeed loading the best
            # checkpoint at train end): its groups are (class, step) cohorts, not classes.
            self.classes = [dict(c) for c in layouts[0]["classes"]]
            self._group_class = [int(x["class"]) for x in layouts]
            self.rebuilds = 1
        else:
            self.classes = [_hp_of(g) for g in base.param_groups]
            self._group_class = list(range(len(self.classes)))
        self.class_of: Dict[int, int] = {}
        for params, gi, _ in ds.param_groups(self.zero):
            for p in params:
                self.class_of[id(p)] = self._group_class[gi]

    def _refuse_unsupported(self) -> None:
        """Every configuration this backend does not support, refused in one place."""
        ds.check_deepspeed_version()
        if self.wrapper is None:
            raise ValueError("SpectrumCallback got no optimizer at on_train_begin under DeepSpeed")
        if self.stage == 0:
            raise ValueError(
                f"unsupported DeepSpeed optimizer {type(self.zero).__name__}: SpectrumCallback supports ZeRO stages "
                "1, 2 and 3 (zero_optimization.stage in the DeepSpeed config); for stage 0 drop DeepSpeed or freeze "
                "before training with spectrum_freeze(model, ...)"
            )
        if self.engine is None:
            raise ValueError(
                "SpectrumCallback could not find the DeepSpeed engine that owns the optimizer; use it with "
                "transformers.Trainer (trainer.add_callback(...)) so that trainer.model_wrapped is the engine"
            )
        opt_block = ds.config_optimizer(self.engine)
        if opt_block is not None:
            raise ValueError(
                f"the DeepSpeed config has an 'optimizer' block ({opt_block}): SpectrumCallback "
                "rebuilds the ZeRO optimizer when the selection changes and supports the Trainer's torch optimizer "
                "only. Remove the 'optimizer' block from the DeepSpeed config (set the optimizer with "
                "TrainingArguments(optim=..., learning_rate=..., weight_decay=...)) and add "
                '"zero_allow_untested_optimizer": true'
            )
        if getattr(self.engine, "lr_scheduler", None) is not None:
            raise ValueError(
                "the DeepSpeed config has a 'scheduler' block: DeepSpeed's scheduler stays bound to the optimizer "
                "that SpectrumCallback replaces at a switch. Remove the 'scheduler' block and set the schedule with "
                "TrainingArguments(lr_scheduler_type=..., warmup_steps=...)"
            )
        if ds.offload_enabled(self.engine):
            raise ValueError(
                "zero_optimization.offload_optimizer is not supported by SpectrumCallback's DeepSpeed backend "
                "(untested); remove offload_optimizer from the DeepSpeed config"
            )
        base = ds.torch_optimizer(self.zero)
        if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"SpectrumCallback under DeepSpeed supports torch Adam/AdamW (the Trainer's default adamw_torch); "
                f"got {type(base).__name__}. Use TrainingArguments(optim='adamw_torch')"
            )

    # ------------------------------------------------------------------ analyzer
    def gather(self, modules):
        if self.stage == 3:
            # a candidate's parameters: the weight, a parametrization's originals, a fused bank
            return ds.gathered([p for m in modules for p in getattr(m, "params", [m.weight])])
        return super().gather(modules)

    # ------------------------------------------------------------------ setup
    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool) -> None:
        decay, no_decay = self._decay_classes()
        for _, ps in candidates.items():
            for p in ps:
                if id(p) not in self.class_of:
                    self.class_of[id(p)] = decay if ds.full_ndim(p) >= 2 else no_decay
        self._find_scheduler()

    def _decay_classes(self):
        wds = [c.get("weight_decay", 0.0) for c in self.classes]
        decay = max(range(len(wds)), key=lambda i: (wds[i], -i))
        zero = [i for i, w in enumerate(wds) if w == 0.0]
        if not zero:
            # The optimizer was built over a selection without any no-decay parameter (its empty
            # group dropped): the Trainer's no-decay class, for a bias or norm that joins later.
            self.classes.append(dict(self.classes[decay], weight_decay=0.0))
            zero = [len(self.classes) - 1]
        return decay, zero[0]

    def _find_scheduler(self):
        sched = self.lr_scheduler
        if sched is None and self.trainer is not None:
            sched = getattr(self.trainer, "lr_scheduler", None)
        while sched is not None and not hasattr(sched, "base_lrs") and hasattr(sched, "scheduler"):
            sched = sched.scheduler  # accelerate's AcceleratedScheduler
        if sched is None or not hasattr(sched, "base_lrs"):
            logger.warning(
                "Spectrum/DeepSpeed: no lr scheduler found; after a switch every param group keeps the lr of its class"
            )
            return
        self.sched = sched
        groups = ds.torch_optimizer(self.zero).param_groups
        base = list(sched.base_lrs)
        lambdas = list(getattr(sched, "lr_lambdas", []) or [])
        if len(base) != len(groups):
            raise ValueError(
                f"the lr scheduler has {len(base)} param groups but the DeepSpeed optimizer {len(groups)}: it was "
                "built before DeepSpeed dropped empty groups; let the Trainer create the scheduler (no 'scheduler' "
                "block and no custom scheduler built before Trainer(...))"
            )
        # Per class: base lr and lr lambda (the scheduler's lists are per param group).
        cls_base, cls_lambda = [], []
        for c, hp in enumerate(self.classes):
            idx = [i for i, gc_ in enumerate(self._group_class) if gc_ == c and i < len(base)]
            cls_base.append(base[idx[0]] if idx else float(hp.get("initial_lr", hp.get("lr", 0.0))))
            if lambdas:
                cls_lambda.append(lambdas[idx[0]] if idx else lambdas[0])
        self.sched_base = (cls_base, cls_lambda)

    # ------------------------------------------------------------------ switch
    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> SwitchResult:
        for p in leaving:
            p.grad = None
        old_groups = ds.param_groups(self.zero)
        old_ids = {id(p) for ps, _, _ in old_groups for p in ps}
        new_params = self._trainable_in_order()
        if {id(p) for p in new_params} == old_ids and not joining:
            # The optimizer already holds exactly the selection (built after the start-up selection,
            # or laid out for a resume).  Create Adam's state now if it has none yet, as a rebuild does.
            if self.rebuilds == 0 and not ds.moment_keys(ds.torch_optimizer(self.zero)):
                self._init_state(self.zero, [(c, 0) for c in self._group_class], [])
            return SwitchResult()
        if self.rebuilds == 0:
            _say_full_build_once(len(old_ids), len(new_params))
        return self.rebuild(new_params, force_fresh={id(p) for p in joining})

    def _trainable_in_order(self) -> List[nn.Parameter]:
        out, seen = [], set()
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                out.append(p)
        return out

    def rebuild(self, new_params: List[nn.Parameter], force_fresh, layout=None) -> SwitchResult:
        """Replace the ZeRO optimizer by one over ``new_params`` (module doc, steps 1-5).

        ``force_fresh``: ids of parameters that start with fresh state even if the old
        optimizer held them.  ``layout``: ``[(class, step, params)]`` to reproduce exactly
        (resume) instead of grouping by (class, step) cohort.
        """
        old_zero = self.zero
        old_groups = ds.param_groups(old_zero)
        class_lr = self._class_lrs(ds.torch_optimizer(old_zero))  # the lr the scheduler set for the coming step
        keys = ds.moment_keys(ds.torch_optimizer(old_zero))
        kept = self._read_stayers(old_groups, new_params, force_fresh, keys)
        moved = {id(p) for ps, _, _ in old_groups for p in ps} | {id(p) for p in new_params}
        self._retire(old_zero, old_groups, {id(p) for p in new_params})
        # The old optimizer's fp32 partitions, moments and gradient buffers go now, before the
        # new one allocates its own: a switch then costs the stayers' copies, not two optimizers.
        self.last_switch["freed_bytes"] = ds.free_optimizer_memory(old_zero)
        del old_groups
        order, cohorts = self._cohorts(new_params, kept, layout)
        base = self._new_torch_optimizer(order, cohorts, class_lr)
        new_zero = self._install(base, order, keys)
        self._write_stayers(new_params, kept)
        self._repoint(old_zero, new_zero, [c for c, _ in order], class_lr)
        del old_zero
        gc.collect()
        self.rebuilds += 1
        return SwitchResult(moved=moved)

    def _read_stayers(self, old_groups, new_params, force_fresh, keys) -> Dict[int, Kept]:
        """Step 1: step count, fp32 master and moments of the parameters that stay: copies of
        what *this rank* holds of them, nothing gathered.

        Stage 3 partitions each parameter on its own, so a stayer's slice on this rank is
        the same in the new optimizer: its local master and moments are copied as they are
        (``safe_get_local_*``, public).  Stage 1/2 partition flat groups, so the slice moves
        with the group: the fragment this rank owns is copied with its offset, and the new
        owner's slice is reassembled one parameter at a time after the rebuild
        (:meth:`_write_stayers`).  Where the low-precision weights are fp32 they equal the
        master bit for bit (the optimizer copies master to weights after every step) and the
        new optimizer builds its master from them: the master is not copied then.
        """
        base = ds.torch_optimizer(self.zero)
        where = {id(p): flat for ps, _, flat in old_groups for p in ps}
        if keys and self.stage != 3:
            # (Re)map fragments to the current state tensors: a checkpoint load replaces them.
            ds.link_optimizer_state(self.zero)
        stayers = [p for p in new_params if id(p) in where and id(p) not in force_fresh]
        staged = sum(ds.local_tensor(p).numel() for p in stayers) * 4 * (1 + len(keys))
        dev = _staging_device(self.zero, staged)
        kept: Dict[int, Kept] = {}
        for p in stayers:
            st = ds.flat_state(base, where[id(p)])
            step = int(_scalar(st["step"])) if "step" in st else 0
            need = ([] if ds.local_tensor(p).dtype == torch.float32 else [None]) + (list(keys) if step > 0 else [])
            kept[id(p)] = (step, {k: self._copy_local(p, k, dev) for k in need})
        self.last_switch = {"stayers": len(stayers), "staged_bytes": sum(
            _nbytes(v) for _, vals in kept.values() for v in vals.values()), "staging_device": str(dev)}
        return kept

    def _copy_local(self, p, key, dev):
        """A copy of this rank's slice of ``p``'s master (``key=None``) or optimizer state ``key``."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            v = safe_get_local_fp32_param(p) if key is None else safe_get_local_optimizer_state(p, key)
            return None if v is None else v.detach().to(dev, copy=True)
        frag = ds.owned_fragment(p, key)
        return None if frag is None else (frag[0], frag[1].detach().to(dev, copy=True))

    @staticmethod
    def _retire(old_zero, old_groups, new_ids) -> None:
        """Step 2: leavers get storage of their own; the old optimizer and its hooks go."""
        leavers = [p for ps, _, _ in old_groups for p in ps if id(p) not in new_ids]
        ds.release_storage(old_zero, leavers)
        ds.destroy(old_zero)
        ds.clear_flat_states(ds.torch_optimizer(old_zero))

    def _cohorts(self, new_params, kept, layout):
        """Step 3a: one group per (class, Adam step) cohort, in model order (or ``layout``)."""
        cohorts: Dict[Tuple[int, int], List[nn.Parameter]] = {}
        if layout is not None:
            for c, step, ps in layout:
                cohorts[(c, step)] = ps
            return [(c, step) for c, step, _ in layout], cohorts
        for p in new_params:
            c = self.class_of.get(id(p))
            if c is None:
                c = self._decay_classes()[0 if ds.full_ndim(p) >= 2 else 1]
                self.class_of[id(p)] = c
            step = kept[id(p)][0] if id(p) in kept else 0
            cohorts.setdefault((c, step), []).append(p)
        return sorted(cohorts, key=lambda cs: (cs[0], -cs[1])), cohorts

    def _new_torch_optimizer(self, order, cohorts, class_lr):
        """Step 3b: a torch optimizer of the original class and hyperparameters."""
        names = _param_names(self.model)
        groups = []
        for c, step in order:
            g = dict(self.classes[c])
            g["lr"] = class_lr[c]
            g["params"] = cohorts[(c, step)]
            # Saved with the optimizer state by DeepSpeed: lets a resumed run rebuild this layout.
            g[LAYOUT_KEY] = {"class": c, "step": step, "params": [names[id(p)] for p in g["params"]],
                             "classes": [dict(x) for x in self.classes]}
            groups.append(g)
        if not groups:
            raise ValueError("Spectrum selected no trainable parameter; nothing for the DeepSpeed optimizer to train")
        base = self.base_cls(groups)
        base.defaults.update(self.base_defaults)
        return base

    def _install(self, base, order, keys):
        """Step 4a: the engine wraps it as ``deepspeed.initialize`` did; Adam state of every
        group is created (zeros, ``step`` = the cohort's count)."""
        new_zero = ds.configure_optimizer(self.engine, base)
        self.zero = new_zero
        self._init_state(new_zero, order, keys)
        return new_zero

    def _init_state(self, zero, order, keys) -> None:
        """Adam's state for every flat partition: zeros, ``step`` = the cohort's count."""
        base = ds.torch_optimizer(zero)
        for params, gi, flat in ds.param_groups(zero):
            _, step = order[gi]
            state = {"step": adam_step_tensor(step, base.param_groups[gi], flat)}
            for k in keys or self._default_keys(base.param_groups[gi]):
                state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            ds.set_flat_state(base, flat, state)
        ds.link_optimizer_state(zero)

    def _write_stayers(self, new_params, kept) -> None:
        """Step 4b: the stayers' master weights and moments go into the new optimizer, one
        parameter at a time, each copy freed once written.  Stage 3: this rank's slices, as
        they were (``safe_set_local_*``).  Stage 1/2: per parameter and state, the whole
        tensor reassembled from every rank's old fragment (collective, model order) and this
        rank's new slice taken from it (``safe_set_full_*``)."""
        from deepspeed.utils import (safe_set_full_fp32_param, safe_set_full_optimizer_state,
                                     safe_set_local_fp32_param, safe_set_local_optimizer_state)

        for p in new_params:
            if id(p) not in kept:
                continue
            _, vals = kept.pop(id(p))
            for k in list(vals):
                v = vals.pop(k)
                if self.stage == 3:
                    if v is None:
                        continue
                    v = v.to(ds.device_of(p))
                    if k is None:
                        safe_set_local_fp32_param(p, v)
                    else:
                        safe_set_local_optimizer_state(p, v, k)
                else:
                    whole = ds.reassemble(p, v, ds.device_of(p))
                    if k is None:
                        safe_set_full_fp32_param(p, whole)
                    else:
                        safe_set_full_optimizer_state(p, whole, k)
                del v

    def _repoint(self, old_zero, new_zero, group_class, class_lr) -> None:
        """Step 5: accelerate's wrapper (held by the Trainer and the scheduler) and the lr
        scheduler's per-group lists follow the new optimizer."""
        if self.wrapper is not old_zero and hasattr(self.wrapper, "optimizer"):
            self.wrapper.optimizer = new_zero
        elif self.trainer is not None and getattr(self.trainer, "optimizer", None) is old_zero:
            self.trainer.optimizer = new_zero
        self._fix_scheduler(group_class, class_lr)

    def _class_lrs(self, old_base) -> List[float]:
        n = len(self.classes)
        lrs: List[Optional[float]] = [None] * n
        for c, g in zip(self._group_class, old_base.param_groups):
            lrs[c] = float(g["lr"])
        # Classes without a group now: same schedule factor as a class that has one.
        known = [(i, v) for i, v in enumerate(lrs) if v is not None]
        base = self.sched_base[0] if self.sched_base else [c.get("initial_lr", c["lr"]) for c in self.classes]
        for i in range(n):
            if lrs[i] is None:
                if known and base[known[0][0]]:
                    lrs[i] = known[0][1] * base[i] / base[known[0][0]]
                else:
                    lrs[i] = float(self.classes[i]["lr"])
        return [float(x) for x in lrs]

    def _fix_scheduler(self, group_class: List[int], class_lr: List[float]) -> None:
        self._group_class = list(group_class)
        if self.sched is None or self.sched_base is None:
            return
        base, lambdas = self.sched_base
        self.sched.base_lrs = [base[c] for c in group_class]
        if lambdas:
            self.sched.lr_lambdas = [lambdas[c] for c in group_class]
        set_scheduler_last_lr(self.sched, [class_lr[c] for c in group_class])
        for g, c in zip(ds.torch_optimizer(self.zero).param_groups, group_class):
            g["initial_lr"] = base[c]
            g["lr"] = class_lr[c]

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
