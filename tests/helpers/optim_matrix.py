"""The optimizer matrix: which optimizer runs with Spectrum under which engine, and how that
is tested.  The tests parametrize over it and the README's optimizer table is written from
it (``tests/unit/test_docs.py`` checks that the two agree)."""
from __future__ import annotations

import importlib.util

import pytest

# TrainingArguments.optim values, and the package each needs
TORCH_OPTIMS = ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "lion_8bit", "adamw_torch_8bit",
                "adamw_torch_4bit", "adafactor", "schedule_free_adamw", "galore_adamw", "apollo_adamw"]
_PACKAGE = {"adamw_bnb_8bit": "bitsandbytes", "paged_adamw_8bit": "bitsandbytes", "lion_8bit": "bitsandbytes",
            "adamw_torch_8bit": "torchao", "adamw_torch_4bit": "torchao", "schedule_free_adamw": "schedulefree",
            "galore_adamw": "galore_torch", "apollo_adamw": "apollo_torch"}


def require(optim: str) -> None:
    """Fail (not skip) when the optimizer's package is missing: the [optim] extra installs it."""
    pkg = _PACKAGE.get(optim)
    if pkg and importlib.util.find_spec(pkg) is None:
        pytest.fail(f"{optim} needs {pkg}: pip install -e .[test] (the [optim] extra) installs it")


def extra_args(optim: str) -> dict:
    """TrainingArguments an optimizer needs beside ``optim``."""
    if optim in ("galore_adamw", "apollo_adamw"):
        return {"optim_target_modules": [r".*attn.*", r".*mlp.*"]}
    return {}
