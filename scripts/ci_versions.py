"""The versions of the stack in use, for the CI summary lines.

    python scripts/ci_versions.py              one line: "torch 2.13.0, transformers 5.24.0, ..."
    python scripts/ci_versions.py --drift S    the packages whose major.minor differs from
                                               spectrum_callback._fence.STACKS[S], one line;
                                               exit status 1 when there is one
"""
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "trl", "axolotl")


def installed():
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def main(argv):
    found = installed()
    if argv[:1] == ["--drift"] and len(argv) == 2:
        from spectrum_callback import _fence

        if argv[1] not in _fence.STACKS:
            print(f"error: no stack {argv[1]!r} in _fence.STACKS; use one of {sorted(_fence.STACKS)}", file=sys.stderr)
            return 2
        want = _fence.STACKS[argv[1]]
        mm = _fence._major_minor
        drift = [f"{p} {v} (STACKS has {want[p]})" for p, v in found.items() if p in want and mm(v) != mm(want[p])]
        print(", ".join(drift))
        return 1 if drift else 0
    if argv:
        print("usage: ci_versions.py [--drift STACK]", file=sys.stderr)
        return 2
    print(", ".join(f"{p} {v}" for p, v in found.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
