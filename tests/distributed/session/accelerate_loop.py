"""SpectrumSession in a custom accelerate loop, for tests/distributed/session/test_session_distributed.py.

usage: torchrun --nproc_per_node=2 accelerate_loop.py OUT ddp fsdp2 ...   (one process group, in turn)
       python accelerate_loop.py OUT ref:ddp                            (the plain single-process reference)

Each scenario trains a tiny Llama for 6 steps with dynamic Spectrum whose scans are replaced by
a rotating ranking (every re-scan moves the selection), each rank on its half of a global batch
of 4, and writes OUT/<name>.json (rank 0; every rank's checks gathered) and OUT/<name>.weights.pt.
``fsdp2``: accelerate's FSDP2 path (``fully_shard`` per decoder layer, the optimizer remapped to
the DTensor shards); accelerate enables FSDP only on GPUs, so the state it sets from an FSDP2
config there is set here (as in tests/distributed/fsdp/scenarios.py).
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from spectrum_callback import SpectrumAnalyzer, SpectrumConfig, SpectrumSession
from tiny import RandomTokens, frozen_changes, rotating_scan, snapshot_frozen, tiny_model

STEPS, GLOBAL_BATCH, LR, WD = 6, 4, 5e-3, 0.1
# scenario -> its selection policy (the others re-scan, with their scans replaced by a rotating ranking)
POLICIES = {"ddp_rotate_park": dict(policy="rotate", park_state=True), "ddp_random": dict(policy="random", seed=7),
            "ddp_cyclic": dict(policy="cyclic")}


def optimizer_for(model):
    named = list(model.named_parameters())
    return torch.optim.AdamW([{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": WD},
                              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}], lr=LR)


def batch(step, rank, world):
    data = RandomTokens()
    per = GLOBAL_BATCH // world
    rows = [data[step * GLOBAL_BATCH + rank * per + i] for i in range(per)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def accelerator_for(name):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin

    from spectrum_callback._fence.accelerate_internals import reset_state

    reset_state()
    acc = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if name.startswith("fsdp2"):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                                reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT")
        acc.state.distributed_type = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    return acc


def run(name, out):
    reference = name.startswith("ref:")
    name = name.split(":", 1)[-1]
    scan, _ = rotating_scan()
    SpectrumAnalyzer.scan = scan
    dist = torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if dist else (0, 1)
    model = tiny_model("llama")
    optimizer = optimizer_for(model)
    acc = None
    if not reference:
        acc = accelerator_for(name)
        model, optimizer = acc.prepare(model, optimizer)
    policy = POLICIES.get(name, {})
    session = SpectrumSession(model, optimizer, SpectrumConfig(top_pct=0.25, update_every=2, **policy), progress=False)
    session.start()
    losses, violations, state_outside, selections = [], [], [], []
    for step in range(STEPS):
        session.maybe_switch(step)
        snap = snapshot_frozen(session.model)
        loss = model(**batch(step, rank, world)).loss
        (acc.backward(loss) if acc is not None else loss.backward())
        optimizer.step()
        optimizer.zero_grad()
        violations += [n for n, _ in frozen_changes(session.model, snap)]
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        state_outside += [i for i, p in enumerate(opt.state) if not p.requires_grad]
        mean = loss.detach().clone()
        if dist:
            torch.distributed.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
        selections.append(list(session.selected))
    weights = {}
    for n, p in session.model.named_parameters():
        weights[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    checks = {"violations": violations, "state_outside": state_outside, "selections": selections,
              "weights_sum": sum(float(w.double().sum()) for w in weights.values())}
    every = [checks]
    if dist:
        every = [None] * world
        torch.distributed.all_gather_object(every, checks)
    if rank == 0:
        suffix = ".ref" if reference else ""
        torch.save(weights, os.path.join(out, f"{name}{suffix}.weights.pt"))
        result = {"losses": losses, "ranks": every, "history_steps": [h["step"] for h in session.history],
                  "backend": session.backend.name, "wrapped": type(session.wrapped).__name__,
                  "state_numel": session.backend.state_numel()}
        with open(os.path.join(out, f"{name}{suffix}.json"), "w") as fh:
            json.dump(result, fh)
    session.close()
    if dist:
        torch.distributed.barrier()


def main():
    out, names = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        torch.distributed.init_process_group("gloo")
    for name in names:
        try:
            run(name, out)
        except Exception as exc:  # recorded for the test, which prints it
            with open(os.path.join(out, f"{name.split(':', 1)[-1]}{'.ref' if ':' in name else ''}.json"), "w") as fh:
                json.dump({"crash": repr(exc), "trace": traceback.format_exc()}, fh)
            raise
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
