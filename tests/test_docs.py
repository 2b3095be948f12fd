"""The README and the docstrings tell the truth about the API."""
import inspect
import os
import re

from spectrum_callback import SpectrumCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
