"""Build variants: a serial (no OpenMP) build works and gives the same bits."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastadam as fa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import numpy as np, fastadam as fa, fastadam._runtime as rt
assert fa.__file__.startswith({root!r}), fa.__file__
rng = np.random.default_rng(0)
p = rng.standard_normal(100003).astype(np.float32)
g = rng.standard_normal(100003).astype(np.float32)
m = np.zeros_like(p); v = np.zeros_like(p)
for t in (1, 2, 3):
    fa.adam_step(p, g, m, v, step=t, lr=1e-2, weight_decay=0.1, n_threads=2)
print(rt.have_openmp(), fa.isa, p.tobytes().hex()[:64], np.frombuffer(p.tobytes(), np.uint32).sum())
"""


@pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")
def test_serial_build_without_openmp_gives_identical_bits(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.so", "*.c", "_kernels_*.pyx", "bench_results", "__pycache__"))
    env = dict(os.environ, FASTADAM_NO_OPENMP="1", FASTADAM_ISAS="baseline")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                       cwd=src, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("FASTADAM_ISA", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(src))], cwd=tmp_path,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    openmp, isa, head, total = out.stdout.split()
    assert openmp == "False" and isa == "baseline"
    # the same computation in this (OpenMP, best-ISA) build
    rng = np.random.default_rng(0)
    p = rng.standard_normal(100003).astype(np.float32)
    g = rng.standard_normal(100003).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t in (1, 2, 3):
        fa.adam_step(p, g, m, v, step=t, lr=1e-2, weight_decay=0.1, n_threads=2)
    assert head == p.tobytes().hex()[:64]
    assert int(total) == int(np.frombuffer(p.tobytes(), np.uint32).sum())
