"""Helpers for tests/test_torch*.py (not a conftest: the lead owns conftest.py)."""
import math
import os
import socket

import numpy as np

import fastadam

HAVE_NATIVE_SPARSE = hasattr(fastadam, "sparse_adam_step")


def sparse_adam_step_ref(table, indices, grad_rows, exp_avg, exp_avg_sq, *, step, lr=1e-3,
                         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                         decoupled_weight_decay=False, amsgrad=False, max_exp_avg_sq=None,
                         maximize=False, row_step=None, n_threads=None):
    """Plain-numpy stand-in for fastadam.sparse_adam_step (DESIGN.md sparse semantics),
    used only while the native sparse path is not in this branch."""
    assert row_step is None
    b1, b2 = betas
    dt = table.dtype.type
    ids = np.asarray(indices, dtype=np.int64)
    if ids.size == 0:
        return
    uniq, inv = np.unique(ids, return_inverse=True)
    g = np.zeros((uniq.size,) + table.shape[1:], dtype=table.dtype)
    np.add.at(g, inv, grad_rows)
    if maximize:
        g = -g
    p = table[uniq]
    if weight_decay and not decoupled_weight_decay:
        g = g + dt(weight_decay) * p
    if weight_decay and decoupled_weight_decay:
        p = p * dt(1 - lr * weight_decay)
    m = exp_avg[uniq]
    v = exp_avg_sq[uniq]
    m = m + (g - m) * dt(1 - b1)
    v = v + (g * g - v) * dt(1 - b2)
    exp_avg[uniq] = m
    exp_avg_sq[uniq] = v
    if amsgrad:
        vm = np.maximum(max_exp_avg_sq[uniq], v)
        max_exp_avg_sq[uniq] = vm
        v = vm
    bc1 = 1 - b1 ** step
    bc2 = 1 - b2 ** step
    ss = lr * math.sqrt(bc2) / bc1
    table[uniq] = p + dt(-ss) * (m / (np.sqrt(v) + dt(eps)))


def install_sparse_fallback(monkeypatch):
    """Make fastadam.sparse_adam_step exist (numpy stand-in) when the native one is absent."""
    if not HAVE_NATIVE_SPARSE:
        monkeypatch.setattr(fastadam, "sparse_adam_step", sparse_adam_step_ref, raising=False)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
