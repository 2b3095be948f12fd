import logging
import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# tests/axolotl/ needs axolotl, which has its own environment and versions: it runs from
# scripts/ci_axolotl.sh (SPECTRUM_AXOLOTL_TESTS=1), and is not collected otherwise.
collect_ignore_glob = [] if os.environ.get("SPECTRUM_AXOLOTL_TESTS") == "1" else ["axolotl/*"]

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
