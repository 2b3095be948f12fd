"""The README and the docstrings tell the truth about the API."""
import inspect
import os
import re

from dsrun import ROOT
from spectrum_callback import SpectrumCallback


def _usage_block():
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index("spectrum = SpectrumCallback(")
    return text[start:text.index("\n)", start)]


def test_readme_usage_lists_every_argument_with_its_default():
    block = _usage_block()
    for name, param in inspect.signature(SpectrumCallback.__init__).parameters.items():
        if name == "self":
            continue
        shown = re.search(rf"^\s+{name}=(.+?),?\s+#", block, re.M)
        assert shown, f"README usage block does not show {name}="
        assert shown.group(1).rstrip(",").replace('"', "'") == repr(param.default), (name, shown.group(1))


def test_docstring_documents_every_argument_and_the_attributes():
    doc = SpectrumCallback.__doc__
    for name in inspect.signature(SpectrumCallback.__init__).parameters:
        if name != "self":
            assert re.search(rf"\b{name}\b", doc), f"SpectrumCallback docstring lacks {name}"
    for word in ("Example::", "selected:", "history:", "When freezing happens"):
        assert word in doc
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
def _markdown_files():
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "CONTRIBUTING.md")]
    docs = os.path.join(ROOT, "docs")
    files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    return [f for f in files if os.path.isfile(f)]


_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")


def _prose_lines(path):
    """(line number, line) outside fenced code blocks; 4-space code blocks have no tables or links here."""
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


def _cells(row):
    """The cells of a table row: escaped pipes and pipes inside inline code do not split."""
    row = _CODE_SPAN.sub(lambda m: m.group(0).replace("|", "\0"), row.strip())
    row = row.replace("\\|", "\0")
    if row.startswith("|"):
        row = row[1:]
    if row.endswith("|"):
        row = row[:-1]
    return [c.strip() for c in row.split("|")]


_SEPARATOR_CELL = re.compile(r"^:?-{3,}:?$|^:?-+:?$")


def _is_separator(row):
    return "|" in row and all(_SEPARATOR_CELL.match(c) for c in _cells(row))


def _table_problems(path):
    problems = []
    lines = list(_prose_lines(path))
    i = 0
    while i < len(lines):
        number, line = lines[i]
        if not line.lstrip().startswith("|"):
            if _is_separator(line) and (i == 0 or "|" not in lines[i - 1][1]):
                problems.append(f"line {number}: a separator row without a header row")
            i += 1
            continue
        block = [lines[i]]
        while i + 1 < len(lines) and lines[i + 1][0] == lines[i][0] + 1 and lines[i + 1][1].lstrip().startswith("|"):
            i += 1
            block.append(lines[i])
        i += 1
        (head_no, head), rest = block[0], block[1:]
        if not rest or not _is_separator(rest[0][1]):
            problems.append(f"line {head_no}: a table row without a header + separator row (---) under it")
            continue
        width = len(_cells(head))
        for row_no, row in rest:
            if len(_cells(row)) != width:
                problems.append(f"line {row_no}: {len(_cells(row))} cells, the header has {width}")
    return problems


def test_every_markdown_table_is_well_formed():
    found = {os.path.relpath(p, ROOT): _table_problems(p) for p in _markdown_files()}
    assert not {k: v for k, v in found.items() if v}, found


def test_the_table_check_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad.md"
    bad.write_text("| a | b |\n| --- | --- | --- |\n| 1 | 2 |\n\n| x | y |\n| --- | --- |\n| 1 |\n\n"
                   "| lone row | 1 |\n\n```\n| in code | not a table |\n```\n")
    assert [p.split(":")[0] for p in _table_problems(str(bad))] == ["line 2", "line 7", "line 9"]
    good = tmp_path / "good.md"
    good.write_text("| a | b |\n|---|:--:|\n| `x | y` | z \\| w |\n  | indented | ok |\n")
    assert _table_problems(str(good)) == []


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
    found = {os.path.relpath(p, ROOT): _link_problems(p) for p in _markdown_files()}
    assert not {k: v for k, v in found.items() if v}, found


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
