"""Running ``axolotl train`` as a user does: the config (a tiny CPU run with the plugin), the
environment (offline, no telemetry, the venv's ``bin`` on ``PATH``: axolotl execs
``accelerate launch``) and the command."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

PLUGIN = "spectrum_callback.integrations.axolotl.SpectrumPlugin"
BIN = os.path.dirname(sys.executable)


def axolotl_config(base_model: str, dataset: str, out: str, **spectrum) -> dict:
    """An axolotl config training ``base_model`` on CPU for a few steps with the plugin;
    ``spectrum`` adds or overrides keys (a value ``None`` removes the key)."""
    cfg = {
        "base_model": base_model,
        "tokenizer_type": "AutoTokenizer",
        "datasets": [{"path": dataset, "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": os.path.join(out, "prepared"),
        "val_set_size": 0,
        "sequence_len": 64,
        "micro_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "optimizer": "adamw_torch",
        "learning_rate": 1e-3,
        "lr_scheduler": "constant",
        "weight_decay": 0.0,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 4,
        "save_safetensors": True,
        "seed": 0,
        "output_dir": os.path.join(out, "model"),
        "plugins": [PLUGIN],
        "spectrum_top_pct": 0.25,
    }
    for k, v in spectrum.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def axolotl_env() -> dict:
    env = dict(os.environ)
    env.update(PATH=BIN + os.pathsep + env.get("PATH", ""), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", WANDB_MODE="disabled",
               CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def axolotl_train(cfg: dict, out: str, launcher: str = "accelerate", timeout: int = 900) -> subprocess.CompletedProcess:
    """``axolotl train cfg.yml --launcher <launcher>`` as a user runs it (``accelerate``, the
    default, execs ``accelerate launch``; ``python`` trains in the process itself, one start-up
    less); stdout and stderr together in ``.stdout``."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "cfg.yml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh)
    cmd = [os.path.join(BIN, "axolotl"), "train", path, "--launcher", launcher]
    return subprocess.run(cmd, cwd=out, env=axolotl_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
