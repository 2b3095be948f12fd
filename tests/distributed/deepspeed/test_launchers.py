"""The launch paths the README tells users to copy, with 2 CPU processes (gloo):
``scripts/launch_single_node.sh`` with LAUNCHER=torchrun, deepspeed and accelerate, the
shipped ``configs/ds_zero3.json`` and ``configs/accelerate_deepspeed_zero3.yaml``
(``zero3_init_flag: true``). The model arrives partitioned (``from_pretrained`` after
``TrainingArguments``, as a user writes it); Spectrum must scan, select and train it.

Overrides, and why: ``stage3_param_persistence_threshold: 0`` so that the tiny model's
weights are really partitioned (the shipped "auto" keeps small ones whole), and the
training script's CPU-only ``deepspeed.init_distributed(gloo)`` (tests/distributed/deepspeed/train_launched.py).
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from dsrun import ROOT, WORLD, ds_env, free_port, read_rank_results
from tiny import tiny_model

pytest.importorskip("deepspeed")
HERE = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("launch")
    tiny_model("llama", layers=4, seed=0).save_pretrained(d / "model")
    with open(os.path.join(ROOT, "configs", "ds_zero3.json")) as fh:
        cfg = json.load(fh)
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (d / "ds_zero3.json").write_text(json.dumps(cfg))
    with open(os.path.join(ROOT, "configs", "accelerate_deepspeed_zero3.yaml")) as fh:
        yaml = fh.read()
    assert "deepspeed_config_file: configs/ds_zero3.json" in yaml and "zero3_init_flag: true" in yaml
    (d / "accelerate.yaml").write_text(yaml.replace("configs/ds_zero3.json", str(d / "ds_zero3.json")))
    return d


def _expected_first_selection(model_dir):
    from transformers import AutoModelForCausalLM

    from spectrum_callback import SpectrumAnalyzer, select_top

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # not partitioned
    return select_top(SpectrumAnalyzer(model, progress=False).scan(), 0.25)


# torchrun with DeepSpeed is what every scenario of test_deepspeed.py runs under; here the
# launch script's other two paths
@pytest.mark.parametrize("launcher", ["deepspeed", "accelerate"])
def test_readme_launch_path_with_zero3_init(setup, tmp_path, launcher):
    env = ds_env()
    env.update(LAUNCHER=launcher, MASTER_PORT=str(free_port()), DS_CONFIG=str(setup / "ds_zero3.json"),
               ACCELERATE_CONFIG=str(setup / "accelerate.yaml"))
    cmd = ["bash", os.path.join(ROOT, "scripts", "launch_single_node.sh"), str(WORLD),
           os.path.join(HERE, "train_launched.py"), str(tmp_path), str(setup / "model")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    ranks = read_rank_results(tmp_path, "launched", log)
    for r in ranks:
        assert r["world"] == WORLD and r["zero_stage"] == 3
        assert r["via_accelerate"] == (launcher == "accelerate")
        assert r["partitioned_at_load"], "the model was not partitioned by zero.Init at from_pretrained"
        assert r["scans"] == 3 and len(r["selected"]) == 7
        assert r["violations"] == []
        assert r["losses_finite"] and r["losses"][-1] < r["losses"][0]
        for state, trainable in zip(r["state_numel"], r["trainable_numel"]):
            # fp32 master + 2 Adam moments of this rank's share (+ alignment padding)
            assert 3 * trainable / WORLD <= state <= 3 * (trainable / WORLD + 64)
    assert ranks[0]["selected"] == ranks[1]["selected"] and ranks[0]["losses"] == ranks[1]["losses"]
    # the scan of the weights that arrived partitioned equals a scan of the same weights loaded whole
    assert ranks[0]["first_scan"] == _expected_first_selection(setup / "model")


@pytest.mark.parametrize("engine,launcher,want", [
    ("fsdp2", None, ["accelerate", "launch", "--config_file", "configs/accelerate_fsdp2.yaml"]),
    ("zero2", None, ["torchrun", "--standalone"]),
    ("zero3", "accelerate", ["accelerate", "launch", "--config_file", "configs/accelerate_deepspeed_zero3.yaml"]),
])
def test_launcher_picks_the_engines_config(tmp_path, engine, launcher, want):
    """ENGINE selects the default launcher and config (the launchers are stand-ins that print
    what they were called with; on CPU accelerate would silently run DDP, not FSDP2)."""
    for tool in ("accelerate", "torchrun", "deepspeed"):
        stub = tmp_path / tool
        stub.write_text(f'#!/bin/sh\necho {tool} "$@" DS_CONFIG=$DS_CONFIG\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", ENGINE=engine)
    env.pop("DS_CONFIG", None)
    if launcher:
        env["LAUNCHER"] = launcher
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_single_node.sh"), "8", "train.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    words = out.stdout.replace(ROOT + "/", "").split()
    assert words[:len(want)] == want, words
    if engine == "zero2":
        assert "DS_CONFIG=configs/ds_zero2.json" in words


def test_launcher_refuses_an_unknown_engine():
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "launch_single_node.sh"), "8", "train.py"],
                         cwd=ROOT, env=dict(os.environ, ENGINE="fsdp1"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "use zero3, zero2 or fsdp2" in out.stderr
