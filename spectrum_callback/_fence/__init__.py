"""The fence: every private API of torch, transformers, accelerate and DeepSpeed that
spectrum_callback touches lives in this package, and nowhere else.

* :mod:`.torch_internals`: the optimizer's scalar dtype for Adam's ``step``, an lr
  scheduler's last lr, FSDP1's mark on the parameters it flattened;
* :mod:`.transformers_internals`: finding the running ``Trainer`` from a callback event
  (one call-stack walk), and the wrapper around ``transformers.trainer.deepspeed_load_checkpoint``;
* :mod:`.deepspeed_internals`: the ZeRO optimizers' flat groups, partitions and hooks, the
  engine's optimizer set-up, ZeRO-3's partitioned-parameter attributes and the checkpoint
  file names;
* :mod:`.accelerate_internals`: the models an ``Accelerator`` prepared, and resetting its
  process-wide state between two Trainers (benchmarks, tests).  accelerate's optimizer
  wrapper is reached through its public ``optimizer`` attribute.

:data:`TESTED` is the one table of the versions these were checked on;
:func:`check_versions` warns once about versions outside it (DeepSpeed, whose internals
matter most, is refused outside its tested minor version; see
:func:`.deepspeed_internals.check_deepspeed_version`).  ``tests/unit/test_fence.py`` is the
contract test: it fails when an upstream name this package relies on moves.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

# package -> versions the fenced internals were checked on (CPU CI, and one GPU run:
# docs/gpu.md).  Major.minor is what is compared.
TESTED: Dict[str, tuple] = {
    "torch": ("2.11", "2.13"),
    "transformers": ("5.24",),
    "accelerate": ("1.15",),
    "deepspeed": ("0.19",),
}

_warned = set()


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def untested(package: str, version: Optional[str]) -> bool:
    return version is not None and _major_minor(version) not in TESTED.get(package, ())


def check_versions() -> Dict[str, Optional[str]]:
    """Versions in use of the fenced packages; a warning (once per package) for each one
    outside :data:`TESTED`.  DeepSpeed is only looked at if it is already imported."""
    import sys
    from importlib import metadata

    found: Dict[str, Optional[str]] = {}
    for pkg in TESTED:
        if pkg == "deepspeed" and "deepspeed" not in sys.modules:
            continue
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = None
        if untested(pkg, found[pkg]) and pkg not in _warned:
            _warned.add(pkg)
            warnings.warn(
                f"spectrum_callback was checked with {pkg} {', '.join(TESTED[pkg])}.x; this is {pkg} {found[pkg]}. "
                "The private APIs it uses (spectrum_callback/_fence) may have moved: run tests/unit/test_fence.py",
                RuntimeWarning,
                stacklevel=2,
            )
    return found
