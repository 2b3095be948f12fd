"""DeepSpeed internals (checked with DeepSpeed 0.19.8).

No public DeepSpeed API changes the trainable set of a ZeRO optimizer after
``deepspeed.initialize`` (docs/guide/design.md), so the backend
(:mod:`spectrum_callback.backends.deepspeed`) rebuilds it, and everything it needs that is
not public lives here:

* the ZeRO optimizers' flat groups and partitions (stage 1/2: ``bit16_groups``,
  ``single_partition_of_fp32_groups``; stage 3: ``fp16_groups``,
  ``fp32_partitioned_groups_flat``, ``sub_group_to_group_id``), their destruction, the
  lazy mapping of Adam state to parameter fragments, and the optimizer state keyed by a
  flat partition;
* the engine's ``_configure_optimizer`` and config;
* ZeRO-3's attributes on each parameter (``ds_shape``, ``ds_numel``, ``ds_tensor``) and the
  module state a destroyed stage-3 optimizer leaves behind;
* the checkpoint file names of a ZeRO optimizer state.

The public ``deepspeed.utils.safe_get_*``/``safe_set_*`` move the values.
:func:`check_deepspeed_version` refuses other major.minor versions unless
``SPECTRUM_ALLOW_UNTESTED_DEEPSPEED=1``; ``tests/unit/test_fence.py`` fails when a name moves.
"""
from __future__ import annotations

import gc
import glob
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import TESTED

TESTED_DEEPSPEED_STR = "0.19.8"  # the exact release of TESTED["deepspeed"] the checks ran on
ALLOW_ENV = "SPECTRUM_ALLOW_UNTESTED_DEEPSPEED"


# ------------------------------------------------------------------ parameters (no import of deepspeed)
def full_shape(p: torch.Tensor) -> tuple:
    """The whole parameter's shape (ZeRO-3 keeps it in ``ds_shape``; ``.data`` is a
    0-element placeholder between gathers)."""
    shape = getattr(p, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(p.shape)


def full_ndim(p: torch.Tensor) -> int:
    return len(full_shape(p))


def full_numel(p: torch.Tensor) -> int:
    return math.prod(full_shape(p))


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of ``p``: its ZeRO-3 partition (``ds_tensor``) or ``p`` itself."""
    t = getattr(p, "ds_tensor", None)
    return t if t is not None else p


def device_of(p: torch.Tensor) -> torch.device:
    return local_tensor(p).device


def is_partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (``ds_id`` set by ``zero.Init`` or the stage-3 optimizer)."""
    return hasattr(p, "ds_id")


def gathered(params: Sequence[nn.Parameter]):
    """Context in which ZeRO-3 ``params`` are whole on every rank (collective)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def whole(params: Sequence[nn.Parameter]):
    """:func:`gathered` when any of ``params`` is partitioned, else a context that does nothing."""
    import contextlib

    params = list(params)
    return gathered(params) if any(is_partitioned(p) for p in params) else contextlib.nullcontext()


def check_deepspeed_version(version: Optional[str] = None) -> str:
    """Raise on a DeepSpeed major.minor this backend was not checked against."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    major_minor = ".".join(version.split("+")[0].split(".")[:2])
    if major_minor not in TESTED["deepspeed"] and os.environ.get(ALLOW_ENV, "") != "1":
        raise RuntimeError(
            f"spectrum_callback's DeepSpeed backend uses ZeRO optimizer internals checked with DeepSpeed "
            f"{TESTED_DEEPSPEED_STR}; this is DeepSpeed {version}. Install deepspeed=={TESTED_DEEPSPEED_STR}, or set "
            f"{ALLOW_ENV}=1 to try anyway (then run tests/distributed/deepspeed/test_deepspeed.py on your setup first)"
        )
    return version


def stage(zero) -> int:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return 3
    if isinstance(zero, DeepSpeedZeroOptimizer):
        return 2 if zero.partition_gradients else 1
    return 0


def param_groups(zero) -> List[Tuple[List[nn.Parameter], int, torch.Tensor]]:
    """``[(params, torch_group_index, fp32_flat_partition)]`` of a ZeRO optimizer.

    Stage 1/2 (``DeepSpeedZeroOptimizer``): ``bit16_groups[i]`` pairs with
    ``optimizer.param_groups[i]`` and ``single_partition_of_fp32_groups[i]``.
    Stage 3: sub-group ``j`` has ``fp16_groups[j]``, ``fp32_partitioned_groups_flat[j]``
    and torch group ``sub_group_to_group_id[j]``.
    """
    if stage(zero) == 3:
        return [
            (list(ps), int(zero.sub_group_to_group_id[j]), zero.fp32_partitioned_groups_flat[j])
            for j, ps in enumerate(zero.fp16_groups)
        ]
    return [(list(ps), i, zero.single_partition_of_fp32_groups[i]) for i, ps in enumerate(zero.bit16_groups)]


def release_storage(zero, params: Sequence[nn.Parameter]) -> None:
    """Give ``params`` storage of their own: they are views into the optimizer's flat
    low-precision buffer (stage 1/2: ``param.data``; stage 3: ``param.ds_tensor``), which
    would otherwise stay alive after the optimizer is gone."""
    stage3 = stage(zero) == 3
    with torch.no_grad():
        if stage3:
            for p in params:
                p.ds_tensor.data = p.ds_tensor.data.clone()
            return
        # Stage 1/2, group by group: the group's leavers get their copies, then the optimizer's
        # own references to the group's flat buffer go, so that it is freed as soon as nothing
        # views it (now when every parameter of the group leaves, else when the new optimizer
        # re-points the stayers): at most one group's weights are held twice at a time.
        leaving = {id(p) for p in params}
        for i, ps in enumerate(zero.bit16_groups):
            for p in ps:
                p._hp_mapping = None  # its lp_fragment views the flat buffer (destroy() would clear it)
                if id(p) in leaving:
                    p.data = p.data.clone()
            flat = zero.bit16_groups_flat[i]
            zero.bit16_groups_flat[i] = flat.new_empty(0)
            zero.parallel_partitioned_bit16_groups[i] = []
            del flat


def destroy(zero) -> None:
    """Remove the old optimizer's hooks (stage 3: also its module forward/backward hooks)."""
    zero.destroy()
    if stage(zero) == 3:
        forget_stage3_module_state(zero)
    else:
        # destroy() clears _hp_mapping only for the groups; drop the bound helpers' target too.
        for ps in zero.bit16_groups:
            for p in ps:
                p._hp_mapping = None


def forget_stage3_module_state(zero) -> None:
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


def configure_optimizer(engine, torch_optimizer) -> object:
    """Let the engine wrap a new basic optimizer exactly as ``deepspeed.initialize`` did.

    At stage 1/2 without offload, ``DeepSpeedZeroOptimizer.initialize_optimizer_states``
    gives every fp32 partition a zero gradient, all at once, and then sets them all back to
    ``None``: for torch Adam/AdamW (the only optimizers the backend accepts) it leaves
    nothing behind but a transient of one more fp32 master in memory.  During this call it
    does the same one partition at a time (:func:`_one_partition_at_a_time`)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    orig = DeepSpeedZeroOptimizer.initialize_optimizer_states
    DeepSpeedZeroOptimizer.initialize_optimizer_states = _one_partition_at_a_time(orig)
    try:
        engine._configure_optimizer(torch_optimizer, None)
    finally:
        DeepSpeedZeroOptimizer.initialize_optimizer_states = orig
    return engine.optimizer


def _one_partition_at_a_time(orig):
    def initialize_optimizer_states(self):
        if self.cpu_offload or isinstance(self.optimizer, torch.optim.Adagrad):
            return orig(self)  # these keep what it allocates
        for i, flat in enumerate(self.single_partition_of_fp32_groups):
            flat.grad = torch.zeros(int(self.partition_size[i]), dtype=flat.dtype, device=self.device)
            flat.grad = None

    return initialize_optimizer_states


def link_optimizer_state(zero) -> None:
    """Stage 1/2 maps each parameter's fragment of the flat Adam state lazily, at the
    first step; we created the state ourselves, so link now (needed by
    ``safe_set_full_optimizer_state``)."""
    if stage(zero) != 3:
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def is_deepspeed_adam(opt) -> bool:
    """DeepSpeed's own Adam optimizers (``FusedAdam``; ``DeepSpeedCPUAdam`` under
    ``offload_optimizer``), which its ``optimizer`` block builds."""
    mod = type(opt).__module__ or ""
    return mod.startswith("deepspeed.ops.adam") and type(opt).__name__ in ("FusedAdam", "DeepSpeedCPUAdam")


def rebuild_kwargs(opt) -> dict:
    """What the constructor of ``opt``'s class takes beside the param groups to build the same
    optimizer again: settings DeepSpeed's Adams keep as attributes, not in ``defaults``."""
    name = type(opt).__name__ if is_deepspeed_adam(opt) else ""
    if name == "DeepSpeedCPUAdam":
        return {"adamw_mode": bool(opt.adam_w_mode), "fp32_optimizer_states": bool(opt.fp32_optimizer_states)}
    if name == "FusedAdam":
        return {"adam_w_mode": bool(opt.adam_w_mode), "set_grad_none": bool(opt.set_grad_none)}
    return {}


def adam_step_value(opt, step: int, torch_step: torch.Tensor):
    """Adam's ``state["step"]`` as ``opt`` keeps it: a Python int for DeepSpeed's Adams (their
    kernels take an int), torch's scalar tensor (``torch_step``) otherwise."""
    return int(step) if is_deepspeed_adam(opt) else torch_step


def is_deepspeed_scheduler(sched) -> bool:
    """An lr scheduler of DeepSpeed's own (the config's ``scheduler`` block: ``WarmupLR``,
    ``WarmupDecayLR``, ...), which keeps a reference to the torch optimizer it was built for."""
    return sched is not None and (type(sched).__module__ or "").startswith("deepspeed.runtime.lr_schedules")


def torch_optimizer(zero):
    """The torch optimizer a ZeRO optimizer wraps (``zero.optimizer``); its param groups hold
    the flat fp32 partitions, and its state is keyed by them."""
    return zero.optimizer


def set_flat_state(base_optimizer, flat: torch.Tensor, state: Dict[str, torch.Tensor]) -> None:
    base_optimizer.state[flat] = state


def flat_state(base_optimizer, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
    return base_optimizer.state.get(flat, {})


def clear_flat_states(base_optimizer) -> None:
    base_optimizer.state.clear()


def moment_keys(base_optimizer) -> List[str]:
    """Names of the per-element state tensors (Adam's moments) of a torch optimizer over flat
    partitions; ``[]`` before its first step."""
    for st in base_optimizer.state.values():
        ks = [k for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0]
        if ks:
            return ks
    return []


def checkpoint_param_groups(checkpoint_path: str) -> Optional[list]:
    """The torch param groups stored in rank 0's ZeRO optimizer checkpoint under
    ``checkpoint_path`` (``latest`` names the tag folder; files
    ``*zero_pp_rank_0_mp_rank_*_optim_states.pt``); ``None`` when there is none."""
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

    groups = find_groups(sd)
    del sd
    return groups


def find_engine_of(trainer, zero):
    """The ``DeepSpeedEngine`` whose optimizer is ``zero`` (the Trainer's, accelerate's, or
    any live one)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    for cand in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None)):
        if isinstance(cand, DeepSpeedEngine) and cand.optimizer is zero:
            return cand
    from .accelerate_internals import prepared_models

    for cand in prepared_models(getattr(trainer, "accelerator", None)):
        if isinstance(cand, DeepSpeedEngine) and cand.optimizer is zero:
            return cand
    for obj in gc.get_objects():
        if isinstance(obj, DeepSpeedEngine) and obj.optimizer is zero:
            return obj
    return None


def is_zero_optimizer(opt) -> bool:
    mod = type(opt).__module__ or ""
    return mod.startswith("deepspeed.")


def forget_zero3_engines() -> None:
    """Let destroyed ZeRO-3 engines be freed: DeepSpeed keeps the root module of every one on
    ``parameter_offload.FWD_MODULE_STACK`` and in the class-level ``functools.lru_cache`` of
    ``PartitionedParameterCoordinator.__params_to_release`` (keyed by coordinator and module).
    Only between trainings: no forward pass may be running."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    parameter_offload.FWD_MODULE_STACK.clear()
    fn = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(fn, "__closure__", None) or ():  # instrument_w_nvtx wraps the lru_cache
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()


# ------------------------------------------------------------------ switches that move local state only
def owned_fragment(p: nn.Parameter, key: Optional[str] = None) -> Optional[Tuple[int, torch.Tensor]]:
    """Stage 1/2: ``(start, values)`` of the slice of ``p`` (flattened) that this rank's fp32
    partition holds: the master (``key=None``) or the optimizer state ``key``; ``None`` when
    this rank owns no element of ``p``.  ``values`` is a view into the optimizer's flat
    buffers (``p._hp_mapping``, set by ``link_hp_params``; ``destroy()`` clears it)."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    addr = mapping.lp_fragment_address
    return int(addr.start), mapping.get_hp_fragment(key)


def reassemble(p: nn.Parameter, fragment: Optional[Tuple[int, torch.Tensor]], device) -> torch.Tensor:
    """Stage 1/2, collective over ``p``'s data-parallel group: the whole fp32 tensor of ``p``
    from every rank's :func:`owned_fragment` (what ``safe_get_full_*`` does, but from copies
    taken before the optimizer that owned them was destroyed).  Every rank calls it for the
    same parameters in the same order."""
    import deepspeed.comm as dist

    buf = torch.zeros(full_numel(p), dtype=torch.float32, device=device)
    if fragment is not None:
        start, values = fragment
        buf.narrow(0, start, values.numel()).copy_(values.reshape(-1))
    dist.all_reduce(buf, group=p._dp_group)
    return buf.view(full_shape(p))


def free_storage(t: Optional[torch.Tensor]) -> int:
    """Shrink ``t``'s storage to 0 bytes now (every view of it goes empty); returns the bytes."""
    if t is None or not torch.is_tensor(t) or t.numel() == 0:
        return 0
    st = t.untyped_storage()
    n = st.nbytes()
    st.resize_(0)
    return n


def free_optimizer_memory(zero, keep: Sequence[torch.Tensor] = ()) -> int:
    """Release, now, the memory a destroyed ZeRO optimizer owns alone: the fp32 master
    partitions, the optimizer state keyed by them, their gradient buffers and (stage 3) the
    flat gradient partition buffer, except the tensors in ``keep`` (state that moves into the
    new optimizer as it is).  Their storages are shrunk to 0 bytes, so the memory goes back
    even while something still refers to the old optimizer (the engine, until it gets the
    new one).  The low-precision buffers are not shrunk: parameters still view them until
    the new optimizer re-flattens (at stage 1/2 :func:`release_storage` has dropped the
    optimizer's own references to them, so that each goes as soon as nothing views it).
    Returns the bytes released."""
    base = torch_optimizer(zero)
    freed = 0
    seen = {t.untyped_storage().data_ptr() for t in keep if torch.is_tensor(t) and t.numel()}

    def free(t):
        nonlocal freed
        if torch.is_tensor(t) and t.numel():
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                freed += free_storage(t)

    with torch.no_grad():
        for st in list(base.state.values()):
            for v in st.values():
                if torch.is_tensor(v) and v.ndim > 0:
                    free(v)
        base.state.clear()
        flats = zero.fp32_partitioned_groups_flat if stage(zero) == 3 else zero.single_partition_of_fp32_groups
        for flat in flats:
            if flat.grad is not None:
                free(flat.grad)
                flat.grad = None
            free(flat)
        if stage(zero) == 3:
            free(getattr(zero, "grad_partitions_flat_buffer", None))
        else:
            for buf in getattr(zero, "ipg_buffer", None) or []:
                free(buf)
            free(getattr(zero, "grads_in_partition", None))
    return freed


class _EachGroupBuilt(list):
    """A torch optimizer's ``param_groups`` list that reports each group once the loop
    iterating it has moved past it (see :func:`each_group_built`)."""

    def __init__(self, groups, on_built):
        super().__init__(groups)
        self._on_built = on_built

    def __iter__(self):
        for g in list.__iter__(self):
            yield g
            self._on_built(g)


class each_group_built:
    """Context in which ``on_built(group)`` runs as the ZeRO-1/2 constructor finishes each
    torch param group of ``base_optimizer``.

    ``DeepSpeedZeroOptimizer.__init__`` walks ``optimizer.param_groups`` once
    (``for i, param_group in enumerate(...)``), and for each group flattens its weights,
    builds this rank's fp32 master partition and replaces ``param_group['params']`` by it
    before it asks for the next group.  ``on_built`` runs at that request: it can fill the
    group's new master and free the memory it came from before the next group allocates.
    It also runs for other walks of the list (groups not built yet): it must check
    (``group['params']`` is the master once built) and act once per group.  Outside the
    context the list is a plain list again."""

    def __init__(self, base_optimizer, on_built):
        self.base = base_optimizer
        self.on_built = on_built

    def __enter__(self):
        self.base.param_groups = _EachGroupBuilt(self.base.param_groups, self.on_built)
        return self

    def __exit__(self, *exc):
        self.base.param_groups = list(self.base.param_groups)
        return False
