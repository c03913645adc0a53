"""The README's Python example runs as written (issue 12, item 5).

The code block is taken from README.md itself and executed; only ``load_dataset`` is wrapped so
that it reads the genuine MNIST found for the tests and keeps the first 2000 training samples
(one epoch on 60000 would take a minute on the shared test machines). Skipped without MNIST.
"""

from __future__ import annotations

import re

import pytest

from _tinyrun import HAVE_MNIST, MNIST, REPO


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.skipif(not HAVE_MNIST, reason=f"the genuine MNIST is not in {MNIST} "
                    "(set NEUROSIM_DATA)")
def test_readme_python_example_runs(monkeypatch, capsys):
    import neurosim.datasets as D

    blocks = _python_blocks((REPO / "README.md").read_text())
    assert blocks, "README.md has no ```python block"
    code = blocks[0]
    assert "load_dataset(" in code      # the example loads its data itself

    real = D.load_dataset

    def subset(name, data_dir=None, train_limit=None, **kw):
        return real(name, data_dir=data_dir or MNIST, train_limit=train_limit or 2000, **kw)

    monkeypatch.setattr(D, "load_dataset", subset)
    exec(compile(code, str(REPO / "README.md"), "exec"), {"__name__": "readme"})
    words = capsys.readouterr().out.split()
    accuracy, angle = float(words[0]), float(words[1])
    # one epoch of 2000 samples takes PEPITA far above chance (0.1; about 0.84 measured)
    assert 0.5 < accuracy <= 1.0
    assert 0.0 < angle < 180.0
