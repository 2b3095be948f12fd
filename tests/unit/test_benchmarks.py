"""Every benchmark script starts and describes itself (``--help``): its imports and its options
hold.  What the benchmarks measure is reported in docs/results, not asserted here; the code
paths they time are tested by the suite."""
import os
import subprocess
import sys

from dsrun import ROOT

BENCH = os.path.join(ROOT, "benchmarks")
SCRIPTS = sorted(os.path.join(d, f) for d in (BENCH, os.path.join(BENCH, "gpu")) for f in os.listdir(d)
                 if f.endswith(".py"))
DRIVER = """
import runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    else:
        raise SystemExit(path + ": --help did not exit")
    print("OK", path)
"""


def test_every_benchmark_answers_help():
    assert len(SCRIPTS) >= 10
    out = subprocess.run([sys.executable, "-c", DRIVER, *SCRIPTS], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, BENCH])))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert [line.split()[1] for line in out.stdout.splitlines() if line.startswith("OK ")] == SCRIPTS
