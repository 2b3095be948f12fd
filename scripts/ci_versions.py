"""One line naming the versions of the stack in use (for the CI summary lines)."""
from importlib import metadata

out = []
for pkg in ("torch", "transformers", "accelerate", "deepspeed", "peft", "trl", "axolotl"):
    try:
        out.append(f"{pkg} {metadata.version(pkg)}")
    except metadata.PackageNotFoundError:
        pass
print(", ".join(out))
