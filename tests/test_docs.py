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
