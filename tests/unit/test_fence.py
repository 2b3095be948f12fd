"""Contract test of the fence (spectrum_callback/_fence): every private name of torch,
transformers, accelerate and DeepSpeed the package relies on is still where it was.  When an
upstream release moves one, this fails and names it."""
from __future__ import annotations

import ast
import importlib
import inspect
import os

import pytest
import torch

from dsrun import ROOT
from spectrum_callback import _fence

pytestmark = pytest.mark.stack  # version-sensitive: runs on every CI stack


STACK_PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "trl")


def _installed(pkg):
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def test_versions_in_use_are_a_stack_ci_runs():
    # CI runs the suite on the stacks of _fence.STACKS; a new minor release of any of these
    # (the newest stack installs them unpinned) makes this fail until the table says it passed.
    found = {p: _installed(p) for p in STACK_PACKAGES}
    mm = _fence._major_minor
    matches = [name for name, stack in _fence.STACKS.items() if _fence.STACK_RUNS[name].startswith("CI")
               and all(found[p] is None or mm(found[p]) == mm(stack[p]) for p in STACK_PACKAGES)]
    assert matches, f"{found} is none of the stacks in spectrum_callback/_fence/__init__.py STACKS"
    checked = _fence.check_versions()
    for pkg in ("torch", "transformers", "accelerate"):
        assert not _fence.untested(pkg, checked[pkg]), (pkg, checked[pkg], _fence.TESTED[pkg])


def test_tested_and_floors_are_read_from_the_stacks():
    stacks = {"a": {"torch": "2.13.0", "transformers": "5.24.0"}, "b": {"torch": "2.14.1", "transformers": "5.16.1"},
              "gpu": {"torch": "2.11.0", "transformers": "5.24.0", "deepspeed": "0.19.8"}}
    runs = {"a": "CI: suite", "b": "CI: quick loop", "gpu": "one GPU run"}
    versions = _fence.tested(stacks)
    assert versions["torch"] == ("2.11", "2.13", "2.14") and versions["deepspeed"] == ("0.19",)
    assert versions["accelerate"] == () and set(versions) == set(_fence.FENCED)
    # floors come from the CI stacks only: the GPU run's torch 2.11 is tested, not a floor
    assert _fence.floors(stacks, runs) == {"torch": "2.13.0", "transformers": "5.16.1"}
    assert _fence.TESTED == _fence.tested(_fence.STACKS) and set(_fence.STACK_RUNS) == set(_fence.STACKS)


def test_pyproject_floors_are_the_oldest_versions_run():
    import re
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    floors = _fence.floors()
    seen = set()
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", req)
        name, spec = m.group(1).lower(), m.group(2)
        if name in floors:
            assert spec == f">={floors[name]}", (req, floors[name])
            seen.add(name)
    assert seen == set(floors), set(floors) - seen


@pytest.mark.parametrize("stack,path", [("tested", "constraints-tested.txt"),
                                        ("axolotl 0.19", "constraints-axolotl.txt")])
def test_constraints_files_are_the_stacks(stack, path):
    with open(os.path.join(ROOT, "scripts", path)) as fh:
        pins = dict(line.strip().split("==") for line in fh if line.strip() and not line.startswith("#"))
    assert pins == _fence.STACKS[stack]


def test_the_versions_table_is_rendered_from_the_stacks():
    with open(os.path.join(ROOT, "docs", "guide", "engines.md")) as fh:
        page = fh.read()
    table = _fence.versions_table()
    assert table in page, "paste spectrum_callback._fence.versions_table() into docs/guide/engines.md:\n" + table


def test_untested_version_warns_once(monkeypatch):
    monkeypatch.setattr(_fence, "_warned", set())
    monkeypatch.setitem(_fence.TESTED, "torch", ("0.1",))
    with pytest.warns(RuntimeWarning, match="checked with torch 0.1"):
        _fence.check_versions()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fence.check_versions()  # no second warning


def test_torch_internals():
    from torch.optim.optimizer import _get_scalar_dtype

    from spectrum_callback._fence.torch_internals import adam_step_tensor, set_scheduler_last_lr

    assert _get_scalar_dtype() in (torch.float32, torch.float64)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1.0)
    p.grad = torch.ones(3)
    opt.step()
    # the step tensor we create looks like the one torch's AdamW creates
    ours = adam_step_tensor(1, opt.param_groups[0], p)
    theirs = opt.state[p]["step"]
    assert (ours.dtype, ours.device, ours.shape) == (theirs.dtype, theirs.device, theirs.shape)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    set_scheduler_last_lr(sched, [0.25])
    assert sched.get_last_lr() == [0.25]
    # FSDP1 marks the parameters it flattens
    from torch.distributed.fsdp import _flat_param

    assert "_fsdp_flattened" in inspect.getsource(_flat_param)


def test_torch_fsdp2_internals():
    """refresh_fsdp2_dtypes: FSDPModule._get_fsdp_state()._fsdp_param_group._init_mp_dtypes(),
    which recomputes the group dtypes from the parameters that require grad now."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group, _fully_shard

    assert callable(FSDPModule._get_fsdp_state)
    src = inspect.getsource(_fsdp_param_group.FSDPParamGroup._init_mp_dtypes)
    for needle in ("if p.sharded_param.requires_grad", "self._orig_dtype =", "self._reduce_dtype ="):
        assert needle in src, needle
    assert "._fsdp_param_group" in inspect.getsource(_fully_shard)


def test_accelerate_internals():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    assert "self._models = []" in inspect.getsource(Accelerator.__init__)  # no Accelerator built: no global state
    assert callable(AcceleratorState._reset_state) and callable(GradientState._reset_state)


def test_transformers_internals():
    import transformers.trainer as tr
    from transformers import Trainer

    assert callable(getattr(tr, "deepspeed_load_checkpoint", None))
    assert "deepspeed_load_checkpoint(" in inspect.getsource(tr.Trainer._prepare_for_training)
    # FSDP2 resume: the Trainer loads the optimizer through its module-level load_fsdp_optimizer,
    # positional (plugin, accelerator, optimizer, model, checkpoint dir), before any callback event
    assert callable(getattr(tr, "load_fsdp_optimizer", None))
    src = inspect.getsource(tr.Trainer._load_optimizer_and_scheduler)
    assert "load_fsdp_optimizer(\n" in src and "self.accelerator.state.fsdp_plugin,\n" in src
    assert list(inspect.signature(tr.load_fsdp_optimizer).parameters)[:5] == [
        "fsdp_plugin", "accelerator", "optimizer", "model", "input_dir"]
    # find_trainer reads `self` and `resume_from_checkpoint` from the train() frame
    assert "resume_from_checkpoint" in inspect.signature(Trainer.train).parameters


def test_deepspeed_internals():
    pytest.importorskip("deepspeed")
    import deepspeed
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator, stage3, stage_1_and_2
    from deepspeed.utils import (  # noqa: F401  public API used for the state transfer
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    from spectrum_callback._fence.deepspeed_internals import check_deepspeed_version

    check_deepspeed_version(deepspeed.__version__)
    z12 = inspect.getsource(stage_1_and_2.DeepSpeedZeroOptimizer)
    for needle in ("self.bit16_groups = []", "self.single_partition_of_fp32_groups = []",
                   "def _lazy_init_hp_params_optimizer_state", "self._hp_optimizer_states_linked",
                   "def destroy", "self.partition_gradients", "self.bit16_groups_flat",
                   "self.parallel_partitioned_bit16_groups", "self.partition_size",
                   # each_group_built: one walk of the torch groups, each replaced by its fp32 partition
                   "for i, param_group in enumerate(self.optimizer.param_groups):",
                   "param_group['params'] = [self.single_partition_of_fp32_groups[i]]",
                   # configure_optimizer: the zero gradients it allocates are dropped again
                   "def initialize_optimizer_states", "self.initialize_optimizer_states()",
                   "group.grad = None  #class init"):
        assert needle in z12, needle
    fragment = importlib.import_module("deepspeed.utils.tensor_fragment")
    assert "lp_fragment: torch.Tensor" in inspect.getsource(fragment.tensor_fragment)  # release_storage
    z3 = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3)
    for needle in ("self.fp16_groups = []", "self.fp32_partitioned_groups_flat = []",
                   "self.sub_group_to_group_id[", "def destroy", "self.parameter_offload.destroy()"):
        assert needle in z3, needle
    off = inspect.getsource(parameter_offload)
    for needle in ('if "pre_bwd_fn" not in module.__dict__', 'if "post_bwd_fn" not in module.__dict__',
                   "module.pre_bwd_fn = ", "module.post_bwd_fn = ", "FWD_MODULE_STACK.append(self.module)"):
        assert needle in off, needle
    coord = inspect.getsource(partitioned_param_coordinator.PartitionedParameterCoordinator)
    assert "@functools.lru_cache(maxsize=None)\n    def __params_to_release" in coord
    eng = inspect.getsource(DeepSpeedEngine)
    for needle in ("def _configure_optimizer(self, client_optimizer, model_parameters)", "self._config.optimizer_name",
                   "def zero_offload_optimizer"):
        assert needle in eng, needle
    init = inspect.getsource(deepspeed.runtime.zero.partition_parameters)
    for needle in ("param.ds_shape", "param.ds_numel", "param.ds_tensor", "param.ds_id"):
        assert needle in init, needle
    # checkpoint file names: <prefix>_mp_rank_XX_optim_states.pt, prefix ...zero_pp_rank_<dp rank>
    ckpt = inspect.getsource(DeepSpeedEngine._get_rank_zero_ckpt_name)
    prefix = inspect.getsource(DeepSpeedEngine._get_zero_ckpt_prefix)
    assert "_mp_rank_" in ckpt and "_optim_states.pt" in ckpt and "zero_pp_rank_" in prefix


def test_deepspeed_version_check(monkeypatch):
    from spectrum_callback._fence.deepspeed_internals import ALLOW_ENV, check_deepspeed_version

    monkeypatch.delenv(ALLOW_ENV, raising=False)
    for tested in _fence.TESTED["deepspeed"]:
        check_deepspeed_version(tested + ".0")
    with pytest.raises(RuntimeError, match="0.19.8"):
        check_deepspeed_version("0.20.0")
    with pytest.raises(RuntimeError, match="SPECTRUM_ALLOW_UNTESTED_DEEPSPEED=1"):
        check_deepspeed_version("0.17.6")
    monkeypatch.setenv(ALLOW_ENV, "1")
    check_deepspeed_version("0.20.0")


PRIVATE = ("ds_tensor", "ds_shape", "ds_numel", "ds_id", "_fsdp_flattened", "_get_scalar_dtype", "_last_lr",
           "f_locals", "_configure_optimizer", "bit16_groups", "fp16_groups", "FWD_MODULE_STACK",
           "_lazy_init_hp_params_optimizer_state", "deepspeed_load_checkpoint", "_models", "_hp_mapping",
           "_hp_optimizer_states_linked", "parameter_offload", "sub_group_to_group_id",
           "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "_config", "_reset_state",
           "_PartitionedParameterCoordinator__params_to_release", "_get_fsdp_state", "_init_mp_dtypes",
           "_fsdp_param_group", "load_fsdp_optimizer", "bit16_groups_flat", "parallel_partitioned_bit16_groups",
           "initialize_optimizer_states")


@pytest.mark.parametrize("room", ["spectrum_callback", "spectrum_study", "scripts", "benchmarks"])
def test_private_names_appear_only_inside_the_fence(room):
    # The library, the study, the scripts and the benchmarks reach upstream internals only through the fence
    # (tests may look inside to check them).
    pkg = os.path.join(ROOT, room)
    fence = os.path.join(ROOT, "spectrum_callback", "_fence")
    offenders = []
    for folder, _, files in os.walk(pkg):
        if folder.startswith(fence):
            continue
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            tree = ast.parse(open(path).read())
            for node in ast.walk(tree):
                name = node.attr if isinstance(node, ast.Attribute) else (
                    node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None)
                if name in PRIVATE:
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders
