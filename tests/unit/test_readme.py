"""The README's complete example runs as written (offline SmolLM2-135M-Instruct, KJV text)."""
import os
import re

import pytest
import torch

from dsrun import ROOT

pytestmark = pytest.mark.slow


def _example():
    text = open(os.path.join(ROOT, "README.md")).read()
    m = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lacks the example after <!-- readme-example -->"
    return m.group(1)


def test_the_readme_example_runs_as_written(tmp_path, monkeypatch, capsys):
    from spectrum_study.assets import load_model_and_tokenizer

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace = {}
    exec(compile(_example(), "README.md", "exec"), namespace)
    spectrum, model = namespace["spectrum"], namespace["model"]
    assert len(spectrum.selected) == 49 and len(spectrum.analyzer.names) == 210  # 7 of 30 per type
    assert f"trained 49 of 210 matrices, e.g. {spectrum.selected[0]}" in capsys.readouterr().out
    untouched, _ = load_model_and_tokenizer()
    trained = {n.rsplit(".", 1)[0] for n, p in model.named_parameters()
               if not torch.equal(p, untouched.get_parameter(n))}
    assert trained == set(spectrum.selected)  # those moved; no frozen bit changed
