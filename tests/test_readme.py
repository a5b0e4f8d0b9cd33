"""Every ```python block of the README runs as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_block_runs(i, tmp_path, monkeypatch, capsys):
    if "torch" in BLOCKS[i]:
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # examples may write checkpoints
    exec(compile(BLOCKS[i], f"README block {i}", "exec"), {"__name__": "__readme__"})
