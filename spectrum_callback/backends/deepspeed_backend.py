"""DeepSpeed ZeRO (stages 1, 2 and 3) backend.

What a change of the trainable set does here
---------------------------------------------
ZeRO optimizers take the trainable parameters when they are built and keep fp32
master partitions and optimizer moments in flat per-group buffers (trap 3 in
``docs/deepspeed.md``): a parameter frozen later would still get a zero gradient and
Adam would keep moving it (trap 2).  So at every switch this backend **rebuilds the
ZeRO optimizer over the new trainable set**:

1. read the fp32 master and the moments of the parameters that stay
   (``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``,
   public, collective: all ranks walk the same parameters in the same order);
2. give the parameters that leave their own storage (they pointed into the old
   optimizer's flat buffers) and destroy the old optimizer (its gradient hooks, and
   at stage 3 its module hooks);
3. build a new torch optimizer of the same class and hyperparameters, one param group
   per (original group, Adam step count) "cohort" so that every parameter keeps its
   own bias-correction step exactly as plain ``torch.optim.AdamW`` would (a matrix that
   joins starts at step 0, one that stays keeps its count);
4. let the engine wrap it again (``DeepSpeedEngine._configure_optimizer``), create the
   Adam state of every group (zeros, step = the cohort's count) and write the stayers'
   master weights and moments back (``safe_set_full_fp32_param`` /
   ``safe_set_full_optimizer_state``);
5. re-point accelerate's optimizer wrapper (the Trainer and the lr scheduler hold that
   wrapper) and fix the lr scheduler's per-group lists (trap 6).

Frozen parameters are in no group: nothing touches their bits.  Memory follows the
selection: after a switch the optimizer holds master partitions and moments of the
selected parameters only (``state_numel``).

Engine internals
----------------
Everything that no public DeepSpeed API covers is in the functions whose names start
with ``_ds_`` below, each checked against DeepSpeed 0.19.8.  ``check_deepspeed_version``
refuses other major.minor versions unless ``SPECTRUM_ALLOW_UNTESTED_DEEPSPEED=1``;
``tests/test_deepspeed.py::test_internals_contract`` fails when one of them changes.
"""
from __future__ import annotations

import gc
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .base import OptimizerBackend
from .torch_backend import unwrap_optimizer
from .._logging import get_logger

logger = get_logger(__name__)

TESTED_DEEPSPEED = ((0, 19),)
TESTED_DEEPSPEED_STR = "0.19.8"
ALLOW_ENV = "SPECTRUM_ALLOW_UNTESTED_DEEPSPEED"

__all__ = ["DeepSpeedBackend", "check_deepspeed_version", "TESTED_DEEPSPEED_STR"]


def check_deepspeed_version(version: Optional[str] = None) -> str:
    """Raise on a DeepSpeed major.minor this backend was not checked against."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    try:
        parts = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        parts = None
    if parts not in TESTED_DEEPSPEED and os.environ.get(ALLOW_ENV, "") != "1":
        raise RuntimeError(
            f"spectrum_callback's DeepSpeed backend uses ZeRO optimizer internals checked with DeepSpeed "
            f"{TESTED_DEEPSPEED_STR}; this is DeepSpeed {version}. Install deepspeed=={TESTED_DEEPSPEED_STR}, or set "
            f"{ALLOW_ENV}=1 to try anyway (then run tests/test_deepspeed.py on your setup first)"
        )
    return version


# =====================================================================================
# DeepSpeed internals (checked with DeepSpeed 0.19.8).  Keep every private attribute
# access of this backend inside this fence.
# =====================================================================================
def _ds_stage(zero) -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(zero, DeepSpeedZeroOptimizer):
        return 2 if zero.partition_gradients else 1
    return 0


def _ds_param_groups(zero) -> List[Tuple[List[nn.Parameter], int, torch.Tensor]]:
    """``[(params, torch_group_index, fp32_flat_partition)]`` of a ZeRO optimizer.

    Stage 1/2 (``DeepSpeedZeroOptimizer``): ``bit16_groups[i]`` pairs with
    ``optimizer.param_groups[i]`` and ``single_partition_of_fp32_groups[i]``.
    Stage 3: sub-group ``j`` has ``fp16_groups[j]``, ``fp32_partitioned_groups_flat[j]``
    and torch group ``sub_group_to_group_id[j]``.
    """
    if _ds_stage(zero) == 3:
        return [
            (list(ps), int(zero.sub_group_to_group_id[j]), zero.fp32_partitioned_groups_flat[j])
            for j, ps in enumerate(zero.fp16_groups)
        ]
    return [(list(ps), i, zero.single_partition_of_fp32_groups[i]) for i, ps in enumerate(zero.bit16_groups)]


def _ds_release_storage(zero, params: Sequence[nn.Parameter]) -> None:
    """Give ``params`` storage of their own: they are views into the optimizer's flat
    low-precision buffer (stage 1/2: ``param.data``; stage 3: ``param.ds_tensor``), which
    would otherwise stay alive after the optimizer is gone."""
    stage3 = _ds_stage(zero) == 3
    with torch.no_grad():
        for p in params:
            if stage3:
                p.ds_tensor.data = p.ds_tensor.data.clone()
            else:
                p.data = p.data.clone()


def _ds_destroy(zero) -> None:
    """Remove the old optimizer's hooks (stage 3: also its module forward/backward hooks)."""
    zero.destroy()
    if _ds_stage(zero) == 3:
        _ds_forget_stage3_module_state(zero)
    else:
        # destroy() clears _hp_mapping only for the groups; drop the bound helpers' target too.
        for ps in zero.bit16_groups:
            for p in ps:
                p._hp_mapping = None


def _ds_forget_stage3_module_state(zero) -> None:
    """Drop what a destroyed stage-3 optimizer leaves on the model's modules.

    ``DeepSpeedZeRoOffload._register_hooks_recursively`` creates, once per module, the
    autograd Functions ``module.pre_bwd_fn`` / ``module.post_bwd_fn`` (pre-backward fetch,
    post-backward release of the module's parameters).  Their closures hold the offload
    object that created them, and a later offload reuses them
    (``if "pre_bwd_fn" not in module.__dict__``).  Without this, after a rebuild every
    backward fetch/release of parameters went through the *destroyed* optimizer's
    parameter coordinator while forward (and the recomputation of non-reentrant
    gradient checkpointing, which runs inside backward) went through the new one: the
    recomputed weights came back empty (``CheckpointError ... shape [0]``), and the engine's
    first offload stayed alive.  Removing them makes the new offload create its own.

    ``setup_zero_stage3_hooks`` also pushes the root module onto the global
    ``FWD_MODULE_STACK`` at every optimizer build; pop the destroyed one's entry.
    """
    from deepspeed.runtime.zero import parameter_offload as po

    root = zero.parameter_offload.module
    for m in root.modules():
        m.__dict__.pop("pre_bwd_fn", None)
        m.__dict__.pop("post_bwd_fn", None)
    stack = po.FWD_MODULE_STACK
    if len(stack) > 0 and stack[-1] is root:
        stack.pop()


def _ds_configure_optimizer(engine, torch_optimizer) -> object:
    """Let the engine wrap a new basic optimizer exactly as ``deepspeed.initialize`` did."""
    engine._configure_optimizer(torch_optimizer, None)
    return engine.optimizer


def _ds_link_optimizer_state(zero) -> None:
    """Stage 1/2 maps each parameter's fragment of the flat Adam state lazily, at the
    first step; we created the state ourselves, so link now (needed by
    ``safe_set_full_optimizer_state``)."""
    if _ds_stage(zero) != 3:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _ds_find_engine(trainer, zero):
    from deepspeed.runtime.engine import DeepSpeedEngine

    for cand in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None)):
        if isinstance(cand, DeepSpeedEngine) and cand.optimizer is zero:
            return cand
    acc = getattr(trainer, "accelerator", None)
    for cand in getattr(acc, "_models", []) or []:
        if isinstance(cand, DeepSpeedEngine) and cand.optimizer is zero:
            return cand
    for obj in gc.get_objects():
        if isinstance(obj, DeepSpeedEngine) and obj.optimizer is zero:
            return obj
    return None


def _ds_config_optimizer(engine) -> Optional[str]:
    """Type named by the config's own ``optimizer`` block (``None`` without one)."""
    cfg = getattr(engine, "config", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("optimizer"), dict):
        return str(cfg["optimizer"].get("type", "?"))
    return engine._config.optimizer_name


def _ds_offload_enabled(engine) -> bool:
    cfg = engine.zero_offload_optimizer()
    dev = getattr(cfg, "device", None)
    return dev is not None and str(getattr(dev, "value", dev)) not in ("none", "None")


# ============================================================ end of DeepSpeed internals

_SCALAR_KEYS = ("step",)


LAYOUT_KEY = "spectrum_layout"


def _hp_of(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", LAYOUT_KEY) and not str(k).startswith("_ds")}


class DeepSpeedBackend(OptimizerBackend):
    name = "deepspeed"

    def __init__(self, optimizer, model: nn.Module, trainer=None):
        super().__init__(optimizer, model, trainer)
        check_deepspeed_version()
        if optimizer is None:
            raise ValueError("SpectrumCallback got no optimizer at on_train_begin under DeepSpeed")
        self.wrapper = optimizer
        self.zero = unwrap_optimizer(optimizer)
        self.stage = _ds_stage(self.zero)
        if self.stage == 0:
            raise ValueError(
                f"unsupported DeepSpeed optimizer {type(self.zero).__name__}: SpectrumCallback supports ZeRO stages "
                "1, 2 and 3 (zero_optimization.stage in the DeepSpeed config); for stage 0 drop DeepSpeed or freeze "
                "before training with spectrum_freeze(model, ...)"
            )
        self.engine = _ds_find_engine(trainer, self.zero)
        if self.engine is None:
            raise ValueError(
                "SpectrumCallback could not find the DeepSpeed engine that owns the optimizer; use it with "
                "transformers.Trainer (trainer.add_callback(...)) so that trainer.model_wrapped is the engine"
            )
        opt_block = _ds_config_optimizer(self.engine)
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
        if _ds_offload_enabled(self.engine):
            raise ValueError(
                "zero_optimization.offload_optimizer is not supported by SpectrumCallback's DeepSpeed backend "
                "(untested); remove offload_optimizer from the DeepSpeed config"
            )
        base = self.zero.optimizer
        if not isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"SpectrumCallback under DeepSpeed supports torch Adam/AdamW (the Trainer's default adamw_torch); "
                f"got {type(base).__name__}. Use TrainingArguments(optim='adamw_torch')"
            )
        self.base_cls = type(base)
        self.base_defaults = dict(base.defaults)
        # Class of a parameter = index of the torch param group it was in when the engine was
        # built; the lr scheduler's per-group lists are indexed the same way.
        self.sched = None
        self.sched_base: Optional[Tuple[list, list]] = None
        self.rebuilds = 0
        self._group_class: List[int] = []
        self.analyzer = None
        self.class_of: Dict[int, int] = {}
        layouts = [g.get(LAYOUT_KEY) for g in base.param_groups]
        if layouts and all(isinstance(x, dict) for x in layouts):
            # The optimizer was already laid out by this backend (resume: see install_resume_hook).
            self.classes = [dict(c) for c in layouts[0]["classes"]]
            self._group_class = [int(x["class"]) for x in layouts]
            self.rebuilds = 1
            for params, gi, _ in _ds_param_groups(self.zero):
                for p in params:
                    self.class_of[id(p)] = self._group_class[gi]
        else:
            self.classes = [_hp_of(g) for g in base.param_groups]
            self._group_class = list(range(len(self.classes)))
            for params, gi, _ in _ds_param_groups(self.zero):
                for p in params:
                    self.class_of[id(p)] = gi

    # ------------------------------------------------------------------ analyzer
    def attach_analyzer(self, analyzer) -> None:
        self.analyzer = analyzer
        if self.stage == 3:
            import deepspeed

            def gather(mods):
                params = [m.weight for m in mods]
                return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

            analyzer.gather = gather

    # ------------------------------------------------------------------ setup
    def prepare(self, candidates: Dict[str, List[nn.Parameter]], dynamic: bool) -> None:
        decay, no_decay = self._decay_classes()
        for _, ps in candidates.items():
            for p in ps:
                if id(p) not in self.class_of:
                    self.class_of[id(p)] = decay if _full_ndim(p) >= 2 else no_decay
        self._find_scheduler()

    def _decay_classes(self):
        wds = [c.get("weight_decay", 0.0) for c in self.classes]
        decay = max(range(len(wds)), key=lambda i: (wds[i], -i))
        zero = [i for i, w in enumerate(wds) if w == 0.0]
        return decay, (zero[0] if zero else decay)

    def _find_scheduler(self):
        sched = getattr(self.trainer, "lr_scheduler", None) if self.trainer is not None else None
        while sched is not None and not hasattr(sched, "base_lrs") and hasattr(sched, "scheduler"):
            sched = sched.scheduler
        if sched is None or not hasattr(sched, "base_lrs"):
            logger.warning(
                "Spectrum/DeepSpeed: no lr scheduler found; after a switch every param group keeps the lr of its class"
            )
            return
        self.sched = sched
        groups = self.zero.optimizer.param_groups
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
            idx = [i for i, gc in enumerate(self._group_class) if gc == c and i < len(base)]
            cls_base.append(base[idx[0]] if idx else float(hp.get("initial_lr", hp.get("lr", 0.0))))
            if lambdas:
                cls_lambda.append(lambdas[idx[0]] if idx else lambdas[0])
        self.sched_base = (cls_base, cls_lambda)

    # ------------------------------------------------------------------ switch
    def switch(self, leaving: Sequence[nn.Parameter], joining: Sequence[nn.Parameter]) -> None:
        for p in leaving:
            p.grad = None
        old_groups = _ds_param_groups(self.zero)
        old_ids = {id(p) for ps, _, _ in old_groups for p in ps}
        new_params = self._trainable_in_order()
        new_ids = {id(p) for p in new_params}
        if new_ids == old_ids and not joining:
            return  # the optimizer already holds exactly the selection (e.g. resume)
        self._rebuild(new_params, old_groups, force_fresh={id(p) for p in joining})

    def _trainable_in_order(self) -> List[nn.Parameter]:
        out, seen = [], set()
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                out.append(p)
        return out

    def _rebuild(self, new_params, old_groups, force_fresh, layout=None) -> None:
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        old_zero = self.zero
        old_base = old_zero.optimizer
        where = {}  # id(param) -> (torch group index, fp32 flat)
        for ps, gi, flat in old_groups:
            for p in ps:
                where[id(p)] = (gi, flat)
        new_ids = {id(p) for p in new_params}

        # Current lr per class (the scheduler has set it for the coming step).
        class_lr = self._class_lrs(old_base)

        # 1. Stayers: step count, fp32 master, moments (collective: same order on all ranks).
        keys = self._state_keys(old_base)
        if keys:
            # (Re)map fragments to the current state tensors: a checkpoint load replaces them.
            _ds_link_optimizer_state(old_zero)
        kept: Dict[int, Tuple[int, Optional[torch.Tensor], Dict[str, torch.Tensor]]] = {}
        for p in new_params:
            if id(p) not in where or id(p) in force_fresh:
                continue
            gi, flat = where[id(p)]
            st = old_base.state.get(flat, {})
            step = int(_scalar(st["step"])) if "step" in st else 0
            master = safe_get_full_fp32_param(p)
            moments = {}
            if step > 0:
                for k in keys:
                    v = safe_get_full_optimizer_state(p, k)
                    if v is not None:
                        moments[k] = v.detach().to("cpu", copy=True)
            kept[id(p)] = (step, None if master is None else master.detach().to("cpu", copy=True), moments)

        # 2. Leavers get their own storage; the old optimizer goes.
        leavers = [p for ps, _, _ in old_groups for p in ps if id(p) not in new_ids]
        moved_ids = [id(p) for ps, _, _ in old_groups for p in ps]
        _ds_release_storage(old_zero, leavers)
        _ds_destroy(old_zero)
        old_base.state.clear()
        del old_base, old_groups, where

        # 3. One torch param group per (class, step) cohort, in model order.
        cohorts: Dict[Tuple[int, int], List[nn.Parameter]] = {}
        if layout is not None:
            # Resume: exactly the saved groups, so that DeepSpeed's checkpoint fits.
            for c, step, ps in layout:
                cohorts[(c, step)] = ps
            order = [(c, step) for c, step, _ in layout]
        else:
            for p in new_params:
                c = self.class_of.get(id(p))
                if c is None:
                    c = self._decay_classes()[0 if _full_ndim(p) >= 2 else 1]
                    self.class_of[id(p)] = c
                step = kept[id(p)][0] if id(p) in kept else 0
                cohorts.setdefault((c, step), []).append(p)
            order = sorted(cohorts, key=lambda cs: (cs[0], -cs[1]))
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

        # 4. Engine wraps it; create Adam state; write stayers back.
        new_zero = _ds_configure_optimizer(self.engine, base)
        self.zero = new_zero
        steps = {}
        for params, gi, flat in _ds_param_groups(new_zero):
            c, step = order[gi]
            steps[gi] = step
            state = {"step": _step_tensor(step, base.param_groups[gi], flat)}
            for k in keys or self._default_keys(base.param_groups[gi]):
                state[k] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            base.state[flat] = state
        _ds_link_optimizer_state(new_zero)
        for p in new_params:
            if id(p) not in kept:
                continue
            step, master, moments = kept[id(p)]
            if master is not None:
                safe_set_full_fp32_param(p, master.to(_device_of(p)))
            for k, v in moments.items():
                safe_set_full_optimizer_state(p, v.to(_device_of(p)), k)
        kept.clear()

        # 5. Re-point accelerate's wrapper (held by the Trainer and the scheduler).
        if self.wrapper is not old_zero and hasattr(self.wrapper, "optimizer"):
            self.wrapper.optimizer = new_zero
        elif self.trainer is not None and getattr(self.trainer, "optimizer", None) is old_zero:
            self.trainer.optimizer = new_zero
        self._fix_scheduler([c for c, _ in order], class_lr)
        if self.analyzer is not None and hasattr(self.analyzer, "refresh_keys"):
            # Moved storage, same values: the analyzer may keep SNRs of matrices that did not train.
            moved = set(moved_ids) | {id(p) for p in new_params}
            self.analyzer.refresh_keys(
                [n for n, m in self.analyzer.modules.items() if id(getattr(m, "weight", None)) in moved])
        del old_zero
        gc.collect()
        self.rebuilds += 1

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
        self.sched._last_lr = [class_lr[c] for c in group_class]
        for g, c in zip(self.zero.optimizer.param_groups, group_class):
            g["initial_lr"] = base[c]
            g["lr"] = class_lr[c]

    @staticmethod
    def _state_keys(base) -> List[str]:
        for st in base.state.values():
            ks = [k for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0]
            if ks:
                return ks
        return []

    @staticmethod
    def _default_keys(group) -> List[str]:
        keys = ["exp_avg", "exp_avg_sq"]
        if group.get("amsgrad"):
            keys.append("max_exp_avg_sq")
        return keys

    # ------------------------------------------------------------------ accounting
    def state_numel(self) -> int:
        total = 0
        base = self.zero.optimizer
        for _, _, flat in _ds_param_groups(self.zero):
            total += flat.numel()
            for v in base.state.get(flat, {}).values():
                if torch.is_tensor(v) and v.ndim > 0:
                    total += v.numel()
        return total

    def optimizer_param_ids(self) -> set:
        return {id(p) for ps, _, _ in _ds_param_groups(self.zero) for p in ps}


def _param_names(model) -> Dict[int, str]:
    out = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), n)
    return out


def _full_ndim(p) -> int:
    shape = getattr(p, "ds_shape", None)
    return len(shape) if shape is not None else p.ndim


def _device_of(p):
    t = getattr(p, "ds_tensor", None)
    return (t if t is not None else p).device


def _scalar(v) -> float:
    return float(v.item()) if torch.is_tensor(v) else float(v)


def _step_tensor(step: int, group: dict, flat: torch.Tensor):
    from torch.optim.optimizer import _get_scalar_dtype

    dev = flat.device if (group.get("fused") or group.get("capturable")) else torch.device("cpu")
    return torch.tensor(float(step), dtype=_get_scalar_dtype(), device=dev)


# ------------------------------------------------------------------ resume
# The Trainer builds the DeepSpeed engine from the parameters that require grad when
# train() starts (all of them) and loads the checkpoint right away, before any callback
# event: DeepSpeed's flat optimizer checkpoint would not fit that layout.  The Trainer's
# ``deepspeed_load_checkpoint`` is therefore wrapped: when the checkpoint was written
# with SpectrumCallback (spectrum_state.json) and the running Trainer has one, the
# engine's optimizer is first rebuilt to the saved layout (selection and per-step groups,
# stored by this backend in each param group), then DeepSpeed loads as usual.
_HOOKED = "_spectrum_resume_hook"


def install_resume_hook() -> bool:
    """Wrap ``transformers.trainer.deepspeed_load_checkpoint`` (idempotent)."""
    try:
        import transformers.trainer as tr
    except Exception:  # pragma: no cover
        return False
    orig = getattr(tr, "deepspeed_load_checkpoint", None)
    if orig is None or getattr(orig, _HOOKED, False):
        return orig is not None

    def deepspeed_load_checkpoint(deepspeed_engine, checkpoint_path, *args, **kwargs):
        trainer = _find_spectrum_trainer()
        if trainer is not None and os.path.isfile(os.path.join(checkpoint_path, "spectrum_state.json")):
            prepare_resume_layout(trainer, deepspeed_engine, checkpoint_path)
        return orig(deepspeed_engine, checkpoint_path, *args, **kwargs)

    setattr(deepspeed_load_checkpoint, _HOOKED, True)
    deepspeed_load_checkpoint.__wrapped__ = orig
    tr.deepspeed_load_checkpoint = deepspeed_load_checkpoint
    return True


def _find_spectrum_trainer():
    import inspect

    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        depth = 0
        while frame is not None and depth < 40:
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                cbs = getattr(obj.callback_handler, "callbacks", [])
                if any(type(cb).__name__ == "SpectrumCallback" for cb in cbs):
                    return obj
            frame = frame.f_back
            depth += 1
    finally:
        del frame
    return None


def _saved_layout(checkpoint_path: str):
    """Param-group layout stored in this rank's ZeRO optimizer checkpoint (or None)."""
    import glob

    tag = None
    latest = os.path.join(checkpoint_path, "latest")
    if os.path.isfile(latest):
        with open(latest) as fh:
            tag = fh.read().strip()
    folder = os.path.join(checkpoint_path, tag) if tag else checkpoint_path
    files = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_0_mp_rank_*_optim_states.pt")))
    if not files:
        return None
    sd = torch.load(files[0], map_location="cpu", weights_only=False, mmap=True)

    def find_groups(obj, depth=0):
        if isinstance(obj, dict) and depth < 4:
            if isinstance(obj.get("param_groups"), list):
                return obj["param_groups"]
            for v in obj.values():
                r = find_groups(v, depth + 1)
                if r is not None:
                    return r
        return None

    groups = find_groups(sd) or []
    layout = [g.get(LAYOUT_KEY) for g in groups]
    del sd
    if not layout or not all(isinstance(x, dict) for x in layout):
        return None
    return layout


def prepare_resume_layout(trainer, engine, checkpoint_path: str) -> bool:
    """Rebuild ``engine``'s ZeRO optimizer to the layout saved in ``checkpoint_path``."""
    layout = _saved_layout(checkpoint_path)
    if layout is None:
        return False
    model = engine.module
    by_name = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for x in layout for n in x["params"] if n not in by_name]
    if missing:
        raise ValueError(
            f"{checkpoint_path}: its DeepSpeed optimizer holds parameters this model lacks (e.g. {missing[0]}); "
            "resume with the model the checkpoint was trained with"
        )
    keep = {n for x in layout for n in x["params"]}
    for n, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(n in keep)
    wrapper = trainer.optimizer
    backend = DeepSpeedBackend(wrapper, model, trainer)
    backend.classes = [dict(c) for c in layout[0]["classes"]]
    backend._find_scheduler()
    old_groups = _ds_param_groups(backend.zero)
    spec = [(int(x["class"]), int(x["step"]), [by_name[n] for n in x["params"]]) for x in layout]
    new_params = [p for _, _, ps in spec for p in ps]
    backend._rebuild(new_params, old_groups, force_fresh={id(p) for p in new_params}, layout=spec)
    if dist_rank() == 0:
        logger.info("Spectrum/DeepSpeed: optimizer laid out as saved in %s (%d groups) before loading it",
                       checkpoint_path, len(spec))
    return True


def dist_rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
