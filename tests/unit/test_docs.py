"""The README and the docstrings tell the truth about the API."""
import os
import re

from dsrun import ROOT
from spectrum_callback import SpectrumCallback


def test_the_callback_docstring_points_to_the_one_declaration_of_the_settings():
    doc = SpectrumCallback.__doc__
    for word in ("Example::", "SpectrumConfig", "top_pct", "update_every", "**settings", "selected:", "history:",
                 "When freezing happens"):
        assert word in doc, word
    assert SpectrumCallback.state_dict.__doc__ and SpectrumCallback.save_state.__doc__


def test_the_library_imports_none_of_the_harness_dependencies():
    # peft, datasets, matplotlib and deepspeed load only where they are used.  transformers
    # itself may import peft when it is installed: only what spectrum_callback adds counts.
    import subprocess
    import sys

    heavy = "('peft', 'datasets', 'matplotlib', 'deepspeed', 'spectrum_study')"
    bare = ("import sys, spectrum_callback, spectrum_callback.cli; from spectrum_callback import select_top; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", bare], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])
    full = ("import sys; from transformers import Trainer, TrainerCallback; "
            f"before = {{m for m in {heavy} if m in sys.modules}}; "
            "from spectrum_callback import SpectrumCallback, SpectrumAnalyzer, spectrum_freeze; "
            "import spectrum_callback.backends; "
            f"print(sorted({{m for m in {heavy} if m in sys.modules}} - before))")
    out = subprocess.run([sys.executable, "-c", full], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


def test_version_lives_in_one_place():
    import spectrum_callback

    toml = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'dynamic = ["version"]' in toml and "\nversion =" not in toml.split("[tool.setuptools.dynamic]")[0]
    from importlib.metadata import version

    assert version("spectrum_callback") == spectrum_callback.__version__
    assert os.path.isfile(os.path.join(ROOT, "spectrum_callback", "py.typed"))


# ---------------------------------------------------------------- Markdown tables and links
def _markdown_files(root=ROOT):
    """README.md, CONTRIBUTING.md and every page under docs/ (the guide, the results and what
    the harnesses write there), except the studies' scratch folders (``work/``, ignored by git)."""
    files = [os.path.join(root, "README.md"), os.path.join(root, "CONTRIBUTING.md")]
    for folder, dirs, names in os.walk(os.path.join(root, "docs")):
        dirs[:] = sorted(d for d in dirs if d != "work")
        files += sorted(os.path.join(folder, n) for n in names if n.endswith(".md"))
    return [f for f in files if os.path.isfile(f)]


def test_the_docs_walk_reaches_the_guide_and_the_results():
    found = {os.path.relpath(p, ROOT) for p in _markdown_files()}
    assert {"docs/guide/quickstart.md", "docs/guide/design.md", "docs/results/README.md",
            "docs/results/benchmarks.md"} <= found, sorted(found)


_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
MARKDOWN_LINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "markdown")


def _prose_lines(path):
    """(line number, line) outside fenced code blocks; 4-space code blocks have no links here."""
    inside = None
    for number, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1):
        fence = _FENCE.match(line)
        if fence:
            if inside is None:
                inside = fence.group(1)
            elif fence.group(1) == inside:
                inside = None
            continue
        if inside is None:
            yield number, line


def _table_problems(paths):
    """pymarkdown (pymarkdownlnt) on ``paths``, with GitHub's table extension and only the table
    rules: md055 (every row has a leading and a trailing pipe), md056 (every row has the header's
    cell count; a pipe inside a code span splits cells, as on GitHub, unless escaped ``\\|``)
    and stray-table-row (tests/unit/markdown/stray_table_row.py: a ``|`` line that GitHub shows as
    text, such as a table whose separator row is missing or of another width).  The rules are
    chosen in tests/unit/markdown/pymarkdown.json.  Returns ``path:line:col: RULE: ...`` lines."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "pymarkdown", "--config", os.path.join(MARKDOWN_LINT, "pymarkdown.json"),
           "--add-plugin", os.path.join(MARKDOWN_LINT, "stray_table_row.py"), "scan", *paths]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if "No module named pymarkdown" in out.stderr:
        raise AssertionError("the Markdown table check needs pymarkdownlnt (pip install -e .[test])")
    assert out.returncode in (0, 1) and not out.stderr.strip(), out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout.splitlines()


def test_every_markdown_table_is_well_formed():
    problems = _table_problems(_markdown_files())
    assert not problems, "\n".join(os.path.relpath(p, ROOT) if os.path.isabs(p) else p for p in problems)


def test_the_table_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("| a | b |\n| --- | --- | --- |\n| 1 | 2 |\n\n"     # 1: separator of another width
                   "| x | y |\n| --- | --- |\n| 1 |\n\n"               # 7: a row with too few cells
                   "| lone row | 1 |\n\n"                               # 9: no header or separator
                   "```\n| in code | not a table |\n```\n\n"
                   "| p | q\n| --- | --- |\n| 1 | 2 |\n\n"             # 15: no trailing pipe
                   "| c | d |\n| --- | --- |\n| `x | y` | z |\n\n"     # 21: the code span's pipe splits
                   "text\n| after text | x |\n")                         # 24: a row inside a paragraph
    found = [(int(p.split(":")[1]), p.split(": ")[1]) for p in _table_problems([str(bad)])]
    assert found == [(1, "SPC001"), (7, "MD056"), (9, "SPC001"), (15, "MD055"), (21, "MD056"), (24, "SPC001")], found
    good = tmp_path / "good.md"
    good.write_text("| a | b |\n|---|:--:|\n| `x \\| y` | z \\| w |\n  | indented | ok |\n\n"
                    "text | with a pipe | inside\n")
    assert _table_problems([str(good)]) == []


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path):
    seen, anchors = {}, set()
    for _, line in _prose_lines(path):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _link_problems(path, root=ROOT):
    problems = []
    for number, line in _prose_lines(path):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto, ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not dest.startswith(root + os.sep):
                problems.append(f"line {number}: {target} points outside the repository")
            elif not os.path.exists(dest):
                problems.append(f"line {number}: {target} does not exist")
            elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
                problems.append(f"line {number}: {target}: no heading with the anchor #{anchor}")
    return problems


def test_every_relative_link_resolves():
    found = [f"{os.path.relpath(p, ROOT)}: {problem}" for p in _markdown_files() for problem in _link_problems(p)]
    assert not found, "\n".join(found)


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "there.md").write_text("# A Title: with `code`, punctuation\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-title-with-code-punctuation) [ok](there.md#twice-1) "
                    "[ok](#local) [web](https://example.com/x.md) [mail](mailto:a@b.c) `[code](nowhere.md)`\n"
                    "# Local\n[missing](nowhere.md) [bad anchor](there.md#nope) ![img](gone.png)\n")
    assert _link_problems(str(page), root=str(tmp_path)) == ["line 3: nowhere.md does not exist",
                                         "line 3: there.md#nope: no heading with the anchor #nope",
                                         "line 3: gone.png does not exist"]


def test_no_test_file_edits_sys_path():
    """tests/helpers is found through pytest's ``pythonpath`` and, in workers, through
    ``PYTHONPATH`` from dsrun.ds_env(); a ``sys.path`` edit would hide a wrong layout."""
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "tests")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                text = open(path).read()
                if re.search(r"sys\.path\.(insert|append)\(", text):
                    offenders.append(os.path.relpath(path, ROOT))
    assert offenders == []
