import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REFERENCE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "spectrum_snr"))


@pytest.fixture
def reference_dir():
    if not os.path.isdir(REFERENCE_DIR):
        pytest.fail(f"reference SNR files not found at {REFERENCE_DIR}; CI lays shared/ beside the checkout")
    return REFERENCE_DIR
