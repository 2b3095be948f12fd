#!/usr/bin/env python
"""Re-draw the training benchmark plot from its JSON (step time and memory per method).

    python benchmarks/plot_train.py docs/results/bench_train_cpu.json docs/results/bench_train_cpu.png
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import plot  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="the record benchmarks/train.py wrote")
    p.add_argument("png", help="the plot to write")
    args = p.parse_args(argv)
    with open(args.json) as fh:
        data = json.load(fh)
    plot(data["results"], args.png,
         f"{data['preset']} preset on {data['device']}, {data['steps']} steps, torch {data['torch']}")


if __name__ == "__main__":
    main()
