"""Launching the 2-process DeepSpeed test scripts (tests/ds_scripts/) and reading their results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2


def ds_env():
    """Environment for DeepSpeed on CPU: gloo, one thread, offline, cached JIT extensions."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/spectrum_callback_torch_extensions"))
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, timeout=300):
    cmd = ["nice", "-n", "5", sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={free_port()}", os.path.join(HERE, "ds_scripts", script), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ds_env(), capture_output=True, text=True, timeout=timeout)


def read_rank_results(out, prefix, log):
    """``[<out>/<prefix>.rank<r>.json for every rank]``; fails the test with the log if one is missing."""
    got = []
    for r in range(WORLD):
        path = out / f"{prefix}.rank{r}.json"
        if not path.exists():
            pytest.fail(f"{prefix} run wrote no result for rank {r}:\n{log[-4000:]}")
        got.append(json.loads(path.read_text()))
    return got
