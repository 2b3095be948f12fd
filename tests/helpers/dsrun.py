"""Launching the 2-process worker scripts of tests/distributed/ and reading their results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # the repository
WORLD = 2
# scripts/ci_stack.sh sets it: a scenario file launches only its CORE scenarios (tests/conftest.py)
CORE_ONLY = os.environ.get("SPECTRUM_TESTS_CORE") == "1"


def ds_env():
    """Environment for DeepSpeed on CPU: gloo, one thread, offline, cached JIT extensions."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=os.pathsep.join([ROOT, HERE, env.get("PYTHONPATH", "")]))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/spectrum_callback_torch_extensions"))
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, timeout=600):
    """``torchrun --nproc_per_node=2 script args...`` (``script`` a path), run from the repository."""
    cmd = ["nice", "-n", "5", sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           f"--master_port={free_port()}", script, *map(str, args)]
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


def run_scenarios(script, out, names, refs, parallel=True, timeout=900, what="scenarios"):
    """Run ``script OUT NAME...`` under torchrun (2 processes) and ``script OUT ref:NAME...`` in
    one process (the plain-PyTorch references), side by side or one after the other; return
    ``{name: result, "ref:name": result, "_out": OUT, "_log": both logs}`` (a missing result file
    reads as a crash)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={free_port()}",
           script, out, *names]
    ref_cmd = [sys.executable, script, out, *[f"ref:{n}" for n in refs]]
    logs = []

    def wait(p):
        try:
            logs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            logs.append(p.communicate()[0])
            pytest.fail(f"{what} timed out (deadlock?):\n" + logs[-1][-4000:])

    procs = []
    for c in (cmd, ref_cmd):
        procs.append(subprocess.Popen(["nice", "-n", "5", *c], cwd=ROOT, env=ds_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
        if not parallel:
            wait(procs[-1])
    if parallel:
        for p in procs:
            wait(p)
    results = {}
    for key, file in [(n, f"{n}.json") for n in names] + [("ref:" + n, f"{n}.ref.json") for n in refs]:
        path = os.path.join(out, file)
        results[key] = json.load(open(path)) if os.path.isfile(path) else {"crash": "no result file"}
    results["_out"], results["_log"] = out, "\n".join(logs)
    return results


def scenario_result(results, name):
    """One scenario's result; fails the test with its trace and the log tail if it crashed."""
    r = results[name]
    if "crash" in r:
        pytest.fail(f"{name} crashed: {r['crash']}\n{r.get('trace', '')}\n--- log tail ---\n{results['_log'][-3000:]}")
    return r
