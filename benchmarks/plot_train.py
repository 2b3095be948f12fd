#!/usr/bin/env python
"""Re-draw the training benchmark plot from its JSON (step time and memory per method).

    python benchmarks/plot_train.py docs/results/bench_train_cpu.json docs/results/bench_train_cpu.png
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import plot  # noqa: E402


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit(__doc__)
    with open(argv[0]) as fh:
        data = json.load(fh)
    plot(data["results"], argv[1],
         f"{data['preset']} preset on {data['device']}, {data['steps']} steps, torch {data['torch']}")


if __name__ == "__main__":
    main()
