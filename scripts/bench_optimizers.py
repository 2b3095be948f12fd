#!/usr/bin/env python
"""The command behind the README's optimizer-memory table: runs benchmarks/optimizers.py (the
benchmark itself, with its options) and passes its arguments on."""
import os
import runpy
import sys

sys.argv[0] = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "optimizers.py")
runpy.run_path(sys.argv[0], run_name="__main__")
