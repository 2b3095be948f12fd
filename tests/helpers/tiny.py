"""Tiny random models and data for the tests (importable from subprocess scripts too)."""
from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
import transformers
from torch.utils.data import Dataset

VOCAB = 96


def tiny_config(arch: str = "llama", layers: int = 4, **kw):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if arch == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, **common, **kw)
    if arch == "mistral":
        return transformers.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                          num_key_value_heads=2, **common, **kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                        num_key_value_heads=2, **common, **kw)
    if arch == "phi3":
        return transformers.Phi3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                       num_key_value_heads=4, pad_token_id=0, **common, **kw)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=64, **kw)
    if arch == "mixtral":
        return transformers.MixtralConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                          **common, **kw)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                                           num_experts_per_tok=2, **common, **kw)
    if arch == "deepseek_v3":
        return transformers.DeepseekV3Config(hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                                             num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                                             num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                                             q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                             v_head_dim=16, n_group=1, topk_group=1, **common, **kw)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                         num_experts_per_tok=2, **common, **kw)
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **kw)
    return transformers.AutoModelForCausalLM.from_config(cfg)


class RandomTokens(Dataset):
    def __init__(self, n: int = 64, length: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        # A learnable pattern: next token = (token * 3 + 1) % VOCAB with some noise.
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        seq = [start]
        for _ in range(length - 1):
            seq.append((seq[-1] * 3 + 1) % VOCAB)
        self.data = torch.cat(seq, dim=1)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        x = self.data[i]
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}


def training_args(output_dir, **kw):
    base = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        weight_decay=0.1,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        lr_scheduler_type="linear",
        warmup_steps=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return transformers.TrainingArguments(**base)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def snapshot_frozen(model):
    """Copies of the parameters that do not require grad now (ZeRO-3 partitions gathered;
    FSDP2 DTensors: this rank's shard)."""
    from spectrum_callback._fence.deepspeed_internals import whole

    from spectrum_callback._sharded import local_part

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    with whole([p for _, p in frozen]):  # FSDP2: this rank's shards (each rank checks its own)
        return {n: local_part(p.detach()).clone() for n, p in frozen}


def frozen_changes(model, snap):
    """``[(name, max abs difference)]`` of the parameters in ``snap`` whose bits changed."""
    from spectrum_callback._fence.deepspeed_internals import whole
    from spectrum_callback._sharded import local_part

    named = dict(model.named_parameters())
    out = []
    with whole([named[n] for n in snap]):
        for n, before in snap.items():
            now = local_part(named[n].detach())
            if now.shape != before.shape or not torch.equal(now, before):
                diff = float((now.float() - before.float()).abs().max()) if now.shape == before.shape else float("inf")
                out.append((n, diff))
    return out


def rotating_scan():
    """``(scan, calls)``: a stand-in for ``SpectrumAnalyzer.scan`` whose ranking of the
    layers shifts by one at every call (the same on every rank), so that every scan
    changes the selection.  ``calls["n"]`` counts the scans."""
    calls = {"n": 0}

    def scan(self, names=None):
        i = calls["n"]
        calls["n"] += 1
        layers = sorted({int(n.split(".")[2]) for n in self.names})
        out = OrderedDict()
        for n in self.names:
            layer = int(n.split(".")[2])
            out[n] = {"snr": float((layer - i) % len(layers)), "type": self.types[n]}
        self.last_scan_stats = {"scan_seconds": 0.0, "scanned": float(len(out)), "reused": 0.0}
        return out

    return scan, calls


def all_ranks(obj):
    """Every rank's ``obj``, in rank order (collective; ``[obj]`` in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def init_deepspeed_gloo():
    """``deepspeed.init_distributed(dist_backend="gloo")`` for the CPU test workers, without
    DeepSpeed's shared-memory all-reduce op: on CPU its comm backend JIT-builds that C++ op
    when it starts (about 2 minutes on 2 cores, once per environment), and only its inference
    all-reduce uses it; training goes through gloo either way."""
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo")


def reset_accelerate():
    """Forget accelerate's and transformers' process-wide DeepSpeed state between two
    Trainers in one process (a private accelerate API: spectrum_callback._fence)."""
    from spectrum_callback._fence.accelerate_internals import reset_state

    reset_state()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ds_config(stage, out, optimizer_block=False, scheduler_block=False, offload=False, offload_param=False):
    """Write a copy of ``configs/ds_zero<stage>.json`` for the tests (rank 0 writes, all
    ranks wait): ZeRO-3 really partitions even the tiny weights.

    ``optimizer_block``: DeepSpeed's own ``optimizer`` section, Adam(W) built by DeepSpeed; it
    asks for torch's AdamW (``torch_adam``), so that DeepSpeed compiles no fused Adam for it on
    CPU (2.5 min on 2 cores, per environment).  ``scheduler_block``: a ``WarmupDecayLR``
    section.  ``offload``: ``offload_optimizer`` to the CPU (with the Trainer's optimizer, which
    DeepSpeed takes with ``zero_force_ds_cpu_optimizer: false``); ``offload_param``: ZeRO-3's
    parameters offloaded too."""
    import torch.distributed as dist

    # ZeRO-1 has no config of its own in configs/: the ZeRO-2 one with stage 1. ZeRO-3 with both
    # offloads is the shipped configs/ds_zero3_offload.json.
    name = "ds_zero3_offload" if stage == 3 and offload and offload_param else f"ds_zero{max(stage, 2)}"
    with open(os.path.join(REPO_ROOT, "configs", f"{name}.json")) as fh:
        cfg = json.load(fh)
    zero = cfg["zero_optimization"]
    zero["stage"] = stage
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    tag = ""
    if optimizer_block:
        params = {"lr": "auto", "weight_decay": "auto"}
        if optimizer_block != "deepspeed_adam":  # "deepspeed_adam": DeepSpeed's own C++ Adam (built on first use)
            params["torch_adam"] = True
        cfg["optimizer"] = {"type": "AdamW", "params": params}
        tag += "_opt" if params.get("torch_adam") else "_dsadam"
    if scheduler_block:
        cfg["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": "auto",
                                                               "warmup_num_steps": 1, "total_num_steps": "auto"}}
        tag += "_sched"
    if offload:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        cfg["zero_force_ds_cpu_optimizer"] = False
        tag += "_off"
    if offload_param:
        zero.setdefault("offload_param", {"device": "cpu"})
        tag += "_offp"
    path = os.path.join(out, f"ds_zero{stage}{tag}.json")
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump(cfg, fh)
    if dist.is_initialized():
        dist.barrier()
    return path


class LossLog(transformers.TrainerCallback):
    """The logged losses by step, and SpectrumCallback's ``spectrum/trainable_params`` metric."""

    def __init__(self):
        self.losses = {}
        self.trainable_logged = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses[int(state.global_step)] = float(logs["loss"])
        if logs and "spectrum/trainable_params" in logs:
            self.trainable_logged.append(float(logs["spectrum/trainable_params"]))


def run_scenario_specs(run, out, specs):
    """The scenario scripts' loop: ``run(name, out, reference=...)`` for each spec (``NAME`` or
    ``ref:NAME``); a crash is reported and the next goes on; rank 0 writes OUT/NAME[.ref].json."""
    import sys
    import traceback

    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for spec in specs:
        reference = spec.startswith("ref:")
        name = spec[4:] if reference else spec
        try:
            result = run(name, out, reference=reference)
        except Exception as exc:  # report and go on with the next scenario
            result = {"name": name, "crash": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            print(f"[rank {rank}] " + result["trace"], file=sys.stderr, flush=True)
        if rank == 0:
            with open(os.path.join(out, f"{name}{'.ref' if reference else ''}.json"), "w") as fh:
                json.dump(result, fh, indent=1)
            print(f"SCENARIO {spec} done: {'crash' if 'crash' in result else 'ok'}", flush=True)
