"""scripts/ci_lib.sh's ci_suite: the suite as two pytest runs side by side (tests/unit and
tests/distributed); CI passes only when both do, and its line names both halves."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CI_LIB = os.path.join(ROOT, "scripts", "ci_lib.sh")


def run_ci_suite(tmp_path, unit_body, dist_body, *pytest_args):
    for half, body in (("unit", unit_body), ("distributed", dist_body)):
        (tmp_path / "tests" / half).mkdir(parents=True)
        (tmp_path / "tests" / half / f"test_{half}.py").write_text(body)
    script = (f'source "{CI_LIB}"; ci_suite "{sys.executable}" -q -p no:cacheprovider {" ".join(pytest_args)}; '
              'echo "RC=$CI_RC"; echo "VERDICT=$CI_VERDICT"; echo "TESTS=$CI_TESTS"')
    p = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    keys = ("RC", "VERDICT", "TESTS")
    out = dict(line.split("=", 1) for line in p.stdout.splitlines() if line.split("=", 1)[0] in keys)
    return out, p.stdout


PASS2 = "def test_a():\n    pass\n\ndef test_b():\n    pass\n"
FAIL1 = "def test_c():\n    assert False\n"


def test_both_halves_pass(tmp_path):
    out, log = run_ci_suite(tmp_path, PASS2, "def test_d():\n    pass\n")
    assert out["RC"] == "0" and out["VERDICT"] == "PASS", log
    assert out["TESTS"].startswith("unit: 2 passed") and "; distributed: 1 passed" in out["TESTS"], out
    assert "== tests/unit" in log  # the unit half's output is shown after the distributed half's


@pytest.mark.parametrize("failing", ["unit", "distributed"])
def test_a_failure_in_either_half_fails(tmp_path, failing):
    unit, dist = (FAIL1, PASS2) if failing == "unit" else (PASS2, FAIL1)
    out, log = run_ci_suite(tmp_path, unit, dist)
    assert out["RC"] != "0" and out["VERDICT"] == "FAIL", log
    assert "1 failed" in out["TESTS"].split(";")[0 if failing == "unit" else 1], out


def test_a_filter_that_empties_one_half_is_not_a_failure_but_emptying_both_is(tmp_path):
    out, log = run_ci_suite(tmp_path, PASS2, "def test_d():\n    pass\n", "-k", "test_a")
    assert out["RC"] == "0" and out["VERDICT"] == "PASS", log
    (tmp_path / "again").mkdir()
    out, log = run_ci_suite(tmp_path / "again", PASS2, PASS2, "-k", "nothing_matches")
    assert out["RC"] == "5" and out["VERDICT"] == "FAIL", log
