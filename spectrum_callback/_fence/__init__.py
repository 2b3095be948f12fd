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

:data:`STACKS` is the one table of the versions these were checked on (:data:`TESTED`, by
major.minor, is read from it);
:func:`check_versions` warns once about versions outside it (DeepSpeed, whose internals
matter most, is refused outside its tested minor version; see
:func:`.deepspeed_internals.check_deepspeed_version`).  ``tests/unit/test_fence.py`` is the
contract test: it fails when an upstream name this package relies on moves.
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional

# The stacks the suite passed on, exact versions: CI's three (scripts/constraints-tested.txt
# through scripts/run_tests.sh; scripts/ci_stack.sh axolotl and newest) and one GPU run
# (docs/results/gpu.md).  TESTED, the floors in pyproject.toml and the README's versions table
# (versions_table()) are all read from here; tests/unit/test_fence.py checks that they agree
# and that the stack in use is one of these.
STACKS: Dict[str, Dict[str, str]] = {
    "tested": {"torch": "2.13.0", "transformers": "5.24.0", "accelerate": "1.15.0", "deepspeed": "0.19.8",
               "peft": "0.21.2", "trl": "1.16.0"},
    "axolotl 0.19": {"torch": "2.13.0", "transformers": "5.16.1", "accelerate": "1.13.0", "deepspeed": "0.19.8",
                     "peft": "0.20.0", "trl": "1.9.0", "axolotl": "0.19.0"},
    "newest": {"torch": "2.14.1", "transformers": "5.25.0", "accelerate": "1.16.0",
               "deepspeed": "0.19.8", "peft": "0.21.2", "trl": "1.16.0"},
    "GPU (H200)": {"torch": "2.11.0", "transformers": "5.24.0", "accelerate": "1.15.0", "deepspeed": "0.19.8",
                   "peft": "0.21.2"},
}
# where each stack ran, for the README's table
STACK_RUNS: Dict[str, str] = {
    "tested": "CI: the whole suite (`scripts/run_tests.sh`)",
    "axolotl 0.19": "CI: the `stack` subset (not the FSDP2 model sharded at load, which its Trainer cannot "
                    "train); the axolotl plugin tests (`scripts/ci_axolotl.sh`)",
    "newest": "CI: the `stack` subset, newest releases at CI time (`scripts/ci_stack.sh newest`)",
    "GPU (H200)": "one GPU run (docs/results/gpu.md)",
}
FENCED = ("torch", "transformers", "accelerate", "deepspeed")


def _version_key(v: str) -> tuple:
    return tuple(int(x) for x in v.split("+")[0].split(".")[:3] if x.isdigit())


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def tested(stacks: Dict[str, Dict[str, str]]) -> Dict[str, tuple]:
    """package -> the major.minor versions of it in ``stacks``, oldest first."""
    return {pkg: tuple(sorted({_major_minor(s[pkg]) for s in stacks.values() if pkg in s}, key=_version_key))
            for pkg in FENCED}


# package -> major.minor versions the fenced internals were checked on (what is compared)
TESTED: Dict[str, tuple] = tested(STACKS)


def floors(stacks: Optional[Dict[str, Dict[str, str]]] = None, runs: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """package -> the oldest version a CI stack of :data:`STACKS` runs (pyproject.toml's
    floors); the GPU run, not repeated by CI, does not lower them."""
    stacks, runs = stacks or STACKS, runs or STACK_RUNS
    ci = [s for name, s in stacks.items() if runs[name].startswith("CI")]
    pkgs = sorted({p for s in ci for p in s})
    return {p: min((s[p] for s in ci if p in s), key=_version_key) for p in pkgs}


def versions_table() -> str:
    """The README's versions table (Markdown), rendered from :data:`STACKS`."""
    cols = ["torch", "transformers", "accelerate", "deepspeed", "peft", "trl"]
    lines = ["| stack | " + " | ".join(cols) + " | run |", "|" + " --- |" * (len(cols) + 2)]
    for name, stack in STACKS.items():
        cells = [stack.get(c, "-") for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {STACK_RUNS[name]} |")
    return "\n".join(lines) + "\n"


_warned = set()


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
