"""Sparse-step timing for issue 4's workload (a script, not a unit test).

nn.Embedding(1_000_000, 64) float32; 16384 ids per batch drawn Zipf(1.1) and
scattered over the table by a random permutation (~5.5K unique rows). Times
only the optimizer step, fastadam and torch.optim.SparseAdam interleaved in one
process; reports medians (and minima: this may run on a shared machine).

* ``fixed`` batch (as ``python -m bench --scenario sparse``): the same ids and
  grads every step, so the touched rows stay warm in the caches;
* ``cycling`` batches: 16 different batches in turn (cold rows and grads).

The duplicate merge alone is timed with ``sparse_merge`` (hash + batch-order
linking, the native phase 1 of ``sparse_adam_step``, same thread split).

    PYTHONPATH=$PWD python scripts/sparse_perf.py [--threads 2] [--steps 300] [--wait-idle 120]
"""
import argparse
import os
import time
import warnings

import numpy as np

import fastadam as fa
from fastadam._dispatch import kernels as K


def zipf_batch(rng, perm, k, a):
    z = rng.zipf(a, size=4 * k)
    z = z[z <= perm.size][:k]
    return perm[z - 1].astype(np.int64)


def wait_idle(limit_s):
    t0 = time.time()
    while time.time() - t0 < limit_s and os.getloadavg()[0] > 0.6:
        time.sleep(2)
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="wait up to this many seconds for a 1-min load average < 0.6")
    a = ap.parse_args()
    dt = np.dtype(a.dtype)
    rng = np.random.default_rng(0)
    perm = rng.permutation(a.rows)
    nb = 16
    ids = [zipf_batch(rng, perm, a.k, a.zipf) for _ in range(nb)]
    grads = [rng.standard_normal((a.k, a.dim)).astype(dt) for _ in range(nb)]
    uniq = [np.unique(i).size for i in ids]
    table = (0.01 * rng.standard_normal((a.rows, a.dim))).astype(dt)
    m = np.zeros_like(table)
    v = np.zeros_like(table)
    nt = a.threads
    nparts = min(nt, 8) if a.k >= 4096 else 1
    if a.wait_idle:
        print(f"load average before timing: {wait_idle(a.wait_idle):.2f}")
    print(f"table {a.rows}x{a.dim} {dt}, k={a.k} Zipf({a.zipf}), unique rows/batch: median "
          f"{int(np.median(uniq))}, isa={fa.isa}, threads={nt}")
    tt = {}

    def timed(key, f):
        t0 = time.perf_counter()
        f()
        tt.setdefault(key, []).append(time.perf_counter() - t0)

    torch_opt = None
    if not a.no_torch:
        import torch
        torch.set_num_threads(nt)
        w = torch.nn.Parameter(torch.from_numpy(table.copy()))
        torch_opt = torch.optim.SparseAdam([w], lr=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tgrads = [torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(g),
                                              (a.rows, a.dim)) for i, g in zip(ids, grads)]
    for s in range(1, a.steps + 1):
        b = s % nb
        timed("fixed", lambda: fa.sparse_adam_step(table, ids[0], grads[0], m, v, step=s,
                                                   n_threads=nt))
        timed("cycling", lambda: fa.sparse_adam_step(table, ids[b], grads[b], m, v, step=s,
                                                     n_threads=nt))
        timed("merge", lambda: K.sparse_merge(ids[0], a.rows, nparts))
        if torch_opt is not None and s % 4 == 0:
            w.grad = tgrads[0]
            timed("torch_fixed", torch_opt.step)
    w0 = 10
    med = {k: 1e3 * float(np.median(x[w0 // (4 if k.startswith("torch") else 1):]))
           for k, x in tt.items()}
    mn = {k: 1e3 * float(np.min(x)) for k, x in tt.items()}
    touched = uniq[0] * a.dim
    for key in ("fixed", "cycling"):
        print(f"fastadam sparse_adam_step, {key} batch: {med[key]:.3f} ms/step median "
              f"(min {mn[key]:.3f}), {1e6 * med[key] / touched:.2f} ns per touched element")
    print(f"  merge of duplicates alone: {med['merge']:.3f} ms median (min {mn['merge']:.3f}) "
          f"= {100 * med['merge'] / med['fixed']:.0f}% of the fixed-batch step")
    if "torch_fixed" in med:
        print(f"torch.optim.SparseAdam, fixed batch: {med['torch_fixed']:.3f} ms/step median "
              f"(min {mn['torch_fixed']:.3f}) -> fastadam {med['torch_fixed'] / med['fixed']:.1f}x "
              f"faster (medians), {mn['torch_fixed'] / mn['fixed']:.1f}x (minima)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
