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


# ---------------------------------------------------------------- the subset every CI stack runs
# The tested stack runs the whole suite. The other stacks (axolotl's pins, the newest releases)
# run the quick loop and the tests marked `stack`: the version-sensitive ones. A scenario-based
# distributed test file lists its CORE scenarios; its cases over core scenarios only are marked
# `stack` here, and with SPECTRUM_TESTS_CORE=1 (scripts/ci_stack.sh; dsrun.CORE_ONLY) its launch
# runs those only.


def pytest_collection_modifyitems(config, items):
    for item in items:
        core = getattr(item.module, "CORE", None)
        callspec = getattr(item, "callspec", None)
        if core is None or callspec is None:
            continue
        scenarios = [v for k, v in callspec.params.items() if k in ("name", "ref")]
        if scenarios and all(s in core for s in scenarios):
            item.add_marker(pytest.mark.stack)
