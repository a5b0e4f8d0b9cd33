"""Every ```python block of README.md and of docs/**/*.md runs as written.

The blocks of one file run in order, in one namespace, in a temporary
directory (examples may write checkpoints). A block preceded by a line
``<!-- skip -->`` is not run (for genuinely non-runnable snippets; use sparingly).
"""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
# A fenced python block, optionally preceded by a skip marker on the line before.
BLOCK = re.compile(r"(?:^(<!-- skip -->)[ \t]*\n)?^```python[ \t]*\n(.*?)^```", re.S | re.M)


def blocks(path):
    """The (source, skipped) python blocks of a Markdown file, in order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(2), m.group(1) is not None) for m in BLOCK.finditer(text)]


def _rel(path):
    return os.path.relpath(path, ROOT)


def test_readme_has_examples():
    assert len(blocks(README)) >= 3


def test_skip_marker_parsed():
    text = "a\n<!-- skip -->\n```python\nraise SystemExit\n```\n```python\nx = 1\n```\n"
    found = [(m.group(2), m.group(1) is not None) for m in BLOCK.finditer(text)]
    assert found == [("raise SystemExit\n", True), ("x = 1\n", False)]


@pytest.mark.parametrize("path", [p for p in PAGES if blocks(p)], ids=_rel)
def test_page_blocks_run(path, tmp_path, monkeypatch, capsys):
    todo = blocks(path)
    if any("torch" in src for src, skip in todo if not skip):
        pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, (src, skip) in enumerate(todo):
        if skip:
            continue
        exec(compile(src, f"{_rel(path)} python block {i}", "exec"), namespace)


def test_ci_runs_the_readme_test_command():
    """.ci/run runs exactly the README's test command (in the fresh .venv-ci)."""
    with open(README, encoding="utf-8") as f:
        bash = re.findall(r"^```bash\n(.*?)\n```", f.read(), re.S | re.M)
    tests = [c for c in bash if "pytest" in c]
    assert len(tests) == 1, tests
    assert ".venv-ci" in tests[0]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert tests[0] in f.read().splitlines()
