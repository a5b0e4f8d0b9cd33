"""Sparse-step timing (issue 4 workload), not a unit test.

nn.Embedding(1_000_000, 64) float32, 16384 ids per batch drawn Zipf(1.1) and
scattered over the table by a random permutation (~5.6K unique rows per batch).
Times only the optimizer step; fastadam and torch.optim.SparseAdam interleaved
in one process, medians over many steps. Also times the duplicate merge alone
(``sparse_merge``: hash + linking, no update) to report its share.

    PYTHONPATH=$PWD python scripts/sparse_perf.py [--threads 2] [--steps 200]
"""
import argparse
import time

import numpy as np

import fastadam as fa
from fastadam._dispatch import kernels as K


def batches(n_rows, k, nb, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_rows)
    out = []
    for _ in range(nb):
        z = rng.zipf(1.1, size=4 * k)
        z = z[z <= n_rows][:k]
        out.append(perm[z - 1].astype(np.int64))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    dt = np.dtype(a.dtype)
    nb = 16
    ids = batches(a.rows, a.k, nb)
    rng = np.random.default_rng(1)
    grads = [rng.standard_normal((a.k, a.dim)).astype(dt) for _ in range(nb)]
    uniq = [len(np.unique(i)) for i in ids]
    print(f"table {a.rows}x{a.dim} {dt}, k={a.k}, unique rows/batch: median {int(np.median(uniq))}, "
          f"isa={fa.isa}, threads={a.threads}")
    table = (0.01 * rng.standard_normal((a.rows, a.dim))).astype(dt)
    m = np.zeros_like(table)
    v = np.zeros_like(table)
    torch_opt = None
    if not a.no_torch:
        import torch
        torch.set_num_threads(a.threads)
        emb = torch.nn.Embedding(a.rows, a.dim, sparse=True, dtype=getattr(torch, a.dtype))
        torch_opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
        tgrads = [torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(g),
                                          (a.rows, a.dim)) for i, g in zip(ids, grads)]
    t_fa, t_merge, t_torch = [], [], []
    for s in range(1, a.steps + 1):
        b = s % nb
        t0 = time.perf_counter()
        fa.sparse_adam_step(table, ids[b], grads[b], m, v, step=s, n_threads=a.threads)
        t_fa.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        K.sparse_merge(ids[b], a.rows)
        t_merge.append(time.perf_counter() - t0)
        if torch_opt is not None and s <= max(20, a.steps // 4):
            emb.weight.grad = tgrads[b]
            t0 = time.perf_counter()
            torch_opt.step()
            t_torch.append(time.perf_counter() - t0)
    w = min(10, a.steps // 4)
    fa_ms = 1e3 * np.median(t_fa[w:])
    mg_ms = 1e3 * np.median(t_merge[w:])
    touched = np.median(uniq) * a.dim
    print(f"fastadam sparse_adam_step: {fa_ms:.3f} ms/step, "
          f"{1e6 * fa_ms / touched:.2f} ns per touched element "
          f"({np.median(uniq):.0f} rows x {a.dim})")
    print(f"  merge of duplicates alone: {mg_ms:.3f} ms ({100 * mg_ms / fa_ms:.0f}% of the step)")
    if t_torch:
        th_ms = 1e3 * np.median(t_torch[min(3, len(t_torch) // 4):])
        print(f"torch.optim.SparseAdam: {th_ms:.3f} ms/step -> fastadam is {th_ms / fa_ms:.1f}x faster")


if __name__ == "__main__":
    main()
