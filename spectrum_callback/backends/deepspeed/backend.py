"""DeepSpeed ZeRO (stages 1, 2 and 3) backend.

What a change of the trainable set does here
---------------------------------------------
ZeRO optimizers take the trainable parameters when they are built and keep fp32
master partitions and optimizer moments in flat per-group buffers (trap 3 in
``docs/deepspeed.md``): a parameter frozen later would still get a zero gradient and
Adam would keep moving it (trap 2).  So at every switch this backend **rebuilds the
ZeRO optimizer over the new trainable set**:

1. keep what *this rank* holds of the stayers' fp32 master and moments, nothing gathered.
   Each stayer's slice on a rank is the same before and after the rebuild: stage 3
   partitions each parameter on its own, and at stage 1/2 this backend gives each
   parameter a param group (so a flat partition) of its own, from the start-up
   (:mod:`.startup`) and at every rebuild.  Stage 1/2: the old Adam tensors themselves move
   into the new optimizer (no copy); stage 3: the local slices are copied
   (``deepspeed.utils.safe_get_local_*``, public), on the device when it has room, else in
   host memory.  fp32 weights stand in for an fp32 master (the optimizer copies one to the
   other after every step).  An optimizer laid out otherwise (the Trainer's groups, when
   the start-up hook did not run) has its stayers' owned fragments copied with their offsets;
2. give the parameters that leave their own storage (they pointed into the old
   optimizer's flat buffers), destroy the old optimizer (its gradient hooks, and at stage 3
   its module hooks) and free its fp32 partitions, moments and gradient buffers (all but
   the kept ones) before the new one allocates its own;
3. build a new torch optimizer of the same class and hyperparameters: stage 1/2 one param
   group per parameter, stage 3 one per (original group, Adam step count) "cohort", so that
   every parameter keeps its own bias-correction step exactly as plain
   ``torch.optim.AdamW`` would (a matrix that joins starts at step 0, one that stays keeps
   its count);
4. let the engine wrap it again (``DeepSpeedEngine._configure_optimizer``).  Stage 1/2
   with bf16/fp16 weights: as the constructor builds each kept group, its old fp32 master
   is copied into the new partition and freed before the next group allocates (fenced
   :func:`~spectrum_callback._fence.deepspeed_internals.each_group_built`).  Then the Adam
   state of every group is set: the kept tensors, or zeros with step = the group's count;
   stage 3 writes the stayers' copies back one parameter at a time
   (``safe_set_local_*``); fragments copied from another layout are reassembled one
   tensor at a time (one collective per tensor, model order) and set with
   ``safe_set_full_*``;
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


_said_hook_missed = False


def _say_hook_missed_once(n: int) -> None:
    global _said_hook_missed
    if _said_hook_missed:
        return
    _said_hook_missed = True
    logger.warning(
        "Spectrum/DeepSpeed: %d kept fp32 master partitions were copied after the ZeRO-1/2 optimizer was built, not "
        "while DeepSpeed built each group (its constructor no longer walks the param groups as in DeepSpeed %s): "
        "a switch briefly holds those masters twice", n, ds.TESTED_DEEPSPEED_STR)


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


def _copy_master(new: torch.Tensor, old: torch.Tensor) -> None:
    """Fill a new fp32 master partition from the old one of the same parameter, then free the
    old one's memory."""
    if new.shape != old.shape:
        raise RuntimeError(f"Spectrum/DeepSpeed: a kept fp32 master partition has shape {tuple(old.shape)}, "
                           f"its new partition {tuple(new.shape)}")
    with torch.no_grad():
        new.copy_(old)
    ds.free_storage(old)


def _hp_of(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", LAYOUT_KEY) and not str(k).startswith("_ds")}


def _scalar(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _step_of(state: dict) -> int:
    """Adam's step count in a flat partition's state (0 before its first step)."""
    return int(_scalar(state["step"])) if "step" in state else 0


def _layout_tag(c: int, step: int, names: List[str], classes: List[dict], **extra) -> dict:
    """What each torch param group carries under ``LAYOUT_KEY`` (saved by DeepSpeed with the
    optimizer state; :mod:`.resume` rebuilds the layout from it)."""
    return {"class": c, "step": step, "params": list(names), "classes": [dict(x) for x in classes], **extra}


def _param_names(model) -> Dict[int, str]:
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


def one_group_per_parameter(optimizer, model):
    """The Trainer's torch Adam/AdamW ``optimizer`` (no step taken yet) as one of the same
    class with one param group per parameter, hyperparameters as in its group, each group
    tagged with the layout the ZeRO-1/2 rebuilds keep (``LAYOUT_KEY``, class = index of the
    original group).  Any other optimizer is returned as it is (the backend refuses it)."""
    if optimizer.state:
        return optimizer
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        from ..._dist import is_main

        if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and is_main():
            logger.warning(
                "Spectrum/DeepSpeed: %s is not split into one param group per parameter (only torch Adam/AdamW "
                "themselves are): each ZeRO-1/2 switch then copies the stayers' fragments this rank owns (memory up "
                "to that share) instead of keeping them in place. Use TrainingArguments(optim='adamw_torch')",
                type(optimizer).__name__)
        return optimizer
    names = _param_names(model)
    if any(id(p) not in names for g in optimizer.param_groups for p in g["params"]):
        return optimizer  # it trains something outside the model: left as built
    classes = [_hp_of(g) for g in optimizer.param_groups]
    groups = []
    for c, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            tag = _layout_tag(c, 0, [names[id(p)]], classes, startup=True)
            groups.append(dict(classes[c], params=[p], **{LAYOUT_KEY: tag}))
    if not groups:
        return optimizer
    out = type(optimizer)(groups)
    out.defaults.update(optimizer.defaults)
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
            # one group per parameter from the start-up (.startup) is the Trainer's own optimizer
            self.rebuilds = 0 if all(x.get("startup") for x in layouts) else 1
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
        (resume) instead of the backend's own grouping (:meth:`_groups`).
        """
        self.last_switch = {"kept_in_place": 0, "kept_in_place_bytes": 0}
        old_zero = self.zero
        old_groups = ds.param_groups(old_zero)
        class_lr = self._class_lrs(ds.torch_optimizer(old_zero))  # the lr the scheduler set for the coming step
        keys = ds.moment_keys(ds.torch_optimizer(old_zero))
        reuse = self._reusable(old_groups, new_params, force_fresh, keys) if layout is None else {}
        kept = self._read_stayers(old_groups, new_params, force_fresh | {i for k in reuse for i in k}, keys)
        moved = {id(p) for ps, _, _ in old_groups for p in ps} | {id(p) for p in new_params}
        self._retire(old_zero, old_groups, {id(p) for p in new_params})
        # The old optimizer's fp32 partitions, moments and gradient buffers go now, before the
        # new one allocates its own: a switch then costs the stayers' copies, not two optimizers.
        # State that moves over as it is (``reuse``) stays.
        keep = [t for st, master in reuse.values() for t in [master, *st.values()] if torch.is_tensor(t)]
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

    def _reusable(self, old_groups, new_params, force_fresh, keys) -> Dict[tuple, Tuple[dict, Optional[torch.Tensor]]]:
        """Stage 1/2: the old groups that come back unchanged, and what moves over as it is.

        At stage 1/2 this backend gives each parameter a group of its own (:meth:`_groups`), so
        that, as at stage 3, a staying parameter's slice on this rank is the same before and
        after a rebuild (its group has the same size and the same ranks).  Its Adam state
        tensors then go into the new optimizer as they are (no copy, nothing sent between
        ranks), and so does its fp32 master where the weights are not fp32 (copied into the
        new partition as the constructor builds it, :meth:`_install`).  Returns
        ``{(id(p),): (old Adam state, old master or None)}``.
        """
        if self.stage == 3:
            return {}
        base = ds.torch_optimizer(self.zero)
        new_ids = {id(p) for p in new_params}
        out = {}
        for ps, _, flat in old_groups:
            if len(ps) != 1 or id(ps[0]) not in new_ids or id(ps[0]) in force_fresh:
                continue
            st = dict(ds.flat_state(base, flat))
            if not st or "step" not in st or not all(k in st for k in keys):
                continue  # no Adam state yet: nothing to keep (a bf16 master goes the copying way)
            master = None if ds.local_tensor(ps[0]).dtype == torch.float32 else flat
            out[(id(ps[0]),)] = (st, master)
        self.last_switch.update({"kept_in_place": len(out), "kept_in_place_bytes": sum(
            _nbytes(t) for st, m in out.values() for t in [m, *st.values()] if torch.is_tensor(t) and t.ndim > 0)})
        return out

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
            step = _step_of(st)
            need = ([] if ds.local_tensor(p).dtype == torch.float32 else [None]) + (list(keys) if step > 0 else [])
            kept[id(p)] = (step, {k: self._copy_local(p, k, dev) for k in need})
        self.last_switch.update({"stayers": len(stayers), "staged_bytes": sum(
            _nbytes(v) for _, vals in kept.values() for v in vals.values()), "staging_device": str(dev)})
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

    def _groups(self, new_params, kept, reuse, layout) -> List[Tuple[int, int, List[nn.Parameter]]]:
        """Step 3a: the new torch param groups, ``[(class, Adam step, params)]`` in model order
        (or ``layout``).  Stage 1/2: one group per parameter, so that a parameter's slice on
        each rank does not move at later rebuilds (:meth:`_reusable`); the per-group flat
        buffers also keep what DeepSpeed's constructor flattens at a time to one parameter.
        Stage 3 partitions each parameter on its own anyway: one group per (class, step)
        cohort.  Either way every parameter keeps its own bias-correction step."""
        if layout is not None:
            return [(c, step, list(ps)) for c, step, ps in layout]
        out: List[Tuple[int, int, List[nn.Parameter]]] = []
        cohorts: Dict[Tuple[int, int], List[nn.Parameter]] = {}
        for p in new_params:
            c = self.class_of.get(id(p))
            if c is None:
                c = self._decay_classes()[0 if ds.full_ndim(p) >= 2 else 1]
                self.class_of[id(p)] = c
            if (id(p),) in reuse:
                step = _step_of(reuse[(id(p),)][0])
            else:
                step = kept[id(p)][0] if id(p) in kept else 0
            if self.stage == 3:
                cohorts.setdefault((c, step), []).append(p)
            else:
                out.append((c, step, [p]))
        if self.stage == 3:
            out = [(c, step, cohorts[(c, step)]) for c, step in sorted(cohorts, key=lambda cs: (cs[0], -cs[1]))]
        return out

    def _new_torch_optimizer(self, groups, class_lr):
        """Step 3b: a torch optimizer of the original class and hyperparameters."""
        names = _param_names(self.model)
        torch_groups = []
        for c, step, ps in groups:
            g = dict(self.classes[c])
            g["lr"] = class_lr[c]
            g["params"] = ps
            # Saved with the optimizer state by DeepSpeed: lets a resumed run rebuild this layout.
            g[LAYOUT_KEY] = _layout_tag(c, step, [names[id(p)] for p in ps], self.classes)
            torch_groups.append(g)
        if not torch_groups:
            raise ValueError("Spectrum selected no trainable parameter; nothing for the DeepSpeed optimizer to train")
        base = self.base_cls(torch_groups)
        base.defaults.update(self.base_defaults)
        return base

    def _install(self, base, groups, keys, reuse):
        """Step 4a: the engine wraps it as ``deepspeed.initialize`` did; Adam state of every
        group is created (zeros, ``step`` = the group's count) or moved over (``reuse``).

        Where a reused group's master must move too (weights not fp32), it is copied into the
        new partition as soon as DeepSpeed's constructor has built that group, and the old
        one freed before the next group allocates (:func:`ds.each_group_built`): the extra
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
                new_zero = ds.configure_optimizer(self.engine, base)
        else:
            new_zero = ds.configure_optimizer(self.engine, base)
        self.last_switch["masters_after_build"] = len(masters)
        if masters:
            # The constructor did not walk its groups as the hook expects (another DeepSpeed): the
            # kept masters were all alive beside the new ones.  Copy them now, by group index.
            _say_hook_missed_once(len(masters))
            flat_of = {gi: flat for _, gi, flat in ds.param_groups(new_zero)}
            for i, _, old in list(masters.values()):
                _copy_master(flat_of[i], old)
            masters.clear()
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
