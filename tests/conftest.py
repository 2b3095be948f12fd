import logging
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The original tool's published SNR files, vendored (see tests/data/spectrum_snr/README.md).
REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "spectrum_snr")


@pytest.fixture
def reference_dir():
    return REFERENCE_DIR


@pytest.fixture
def spectrum_log(caplog):
    """caplog for the package logger (it does not propagate to the root, like transformers')."""
    pkg = logging.getLogger("spectrum_callback")
    caplog.handler.setLevel(logging.DEBUG)
    pkg.addHandler(caplog.handler)
    yield caplog
    pkg.removeHandler(caplog.handler)
