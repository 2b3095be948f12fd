"""The optimizer-by-engine table in the README (and the engines guide) is written from
``optim_matrix.MATRIX``, and every cell it calls tested names a test that exists."""
import os
import re

import pytest

from dsrun import ROOT
from optim_matrix import ENGINES, MATRIX, TORCH_OPTIMS, other_optims, readme_table

START, END = "<!-- optimizer-table -->", "<!-- /optimizer-table -->"


@pytest.mark.parametrize("page", ["README.md", os.path.join("docs", "guide", "engines.md")])
def test_the_table_is_written_from_the_matrix(page):
    with open(os.path.join(ROOT, page)) as fh:
        text = fh.read()
    assert START in text and END in text, f"{page} lacks the {START} ... {END} markers"
    block = text[text.index(START) + len(START):text.index(END)].strip()
    assert block == readme_table(), f"paste optim_matrix.readme_table() between the markers of {page}"


def _cells():
    for row, cells in MATRIX.items():
        assert len(cells) == len(ENGINES), row
        for engine, pair in zip(ENGINES, cells):
            for mode, (label, where, what) in zip(("static", "dynamic"), pair):
                yield row, engine, mode, label, where, what


@pytest.mark.parametrize("row,engine,mode,label,where,what", list(_cells()))
def test_every_tested_or_refused_cell_names_a_test_that_exists(row, engine, mode, label, where, what):
    if label in ("not tested", "n/a") or label.startswith("fails upstream"):
        assert where is None
        return
    with open(os.path.join(ROOT, where)) as fh:
        text = fh.read()
    if where.endswith("test_optimizer_matrix.py"):  # parametrized over TORCH_OPTIMS
        assert what in TORCH_OPTIMS and '@pytest.mark.parametrize("optim", TORCH_OPTIMS)' in text
        return
    if where.endswith("test_ddp.py") and what in TORCH_OPTIMS and what != "adamw_torch":  # over other_optims
        assert '@pytest.mark.parametrize("optim", other_optims(CORE_ONLY))' in text
        assert what in other_optims(core=False)
        return
    # the scenario or parameter is named in the test file (a test case, not a comment only)
    assert re.search(rf"[\"'(\[ ]{re.escape(what)}", text), (row, engine, mode, where, what)
