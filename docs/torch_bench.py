"""Torch-level optimizer step timings for the README section "PyTorch drop-ins" (issue 6, bullet 7).

Times ``opt.step()`` -- the whole torch.optim.Optimizer machinery included
(hooks, no_grad, param-group walk, state lookup, the update) -- of fastadam's
drop-ins against torch's own optimizers, interleaved (A B A B ...) so drift
and neighbours' load hit both alike; reports medians.

    python docs/torch_bench.py gpt2      # 148 tensors, 124M params, AdamW
    python docs/torch_bench.py tiny      # the same 148 tensors, 16 elements each (overhead)
    python docs/torch_bench.py sparse    # skip-gram-like SparseAdam on a 1M x 128 table
    python docs/torch_bench.py mixed     # one fastadam Adam vs torch Adam + SparseAdam
    python docs/torch_bench.py all

Gradients are set once and reused: a step reads them and never writes them.
Memory: gpt2 holds two copies of (params, grads, m, v) = ~4 GB.
"""
import argparse
import gc
import json
import statistics
import time

import torch

import fastadam
import fastadam.functional
from fastadam import torch as fat

from bench.scenarios import gpt2_small_shapes  # the suite's GPT-2 small parameter shapes


def make_dense(shapes, cls, **kw):
    g = torch.Generator().manual_seed(0)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.empty(s).normal_(0, 0.02, generator=g))
        p.grad = torch.empty(s).normal_(0, 1e-3, generator=g)
        ps.append(p)
    return ps, cls(ps, **kw)


def _busy_fraction(dt=0.5):
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)          # idle + iowait, total
    i0, t0 = read()
    time.sleep(dt)
    i1, t1 = read()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(max_s):
    """Wait (up to max_s seconds) until the machine is nearly idle (other jobs share it)."""
    if not max_s:
        return
    end = time.time() + max_s
    while time.time() < end:
        busy = _busy_fraction()
        if busy < 0.1:
            return
        time.sleep(2.0)
    print(f"  (machine still busy after waiting {max_s} s: {busy:.0%} busy; timing anyway)")


WAIT_IDLE = 0


def interleaved(fns, repeats, warmup=2):
    """fns: {name: callable}. Returns {name: [seconds...]} measured A B A B ..."""
    wait_idle(WAIT_IDLE)
    for f in fns.values():
        for _ in range(warmup):
            f()
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def report(title, times, ref, extra=None):
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n{title}")
    for k, m in med.items():
        line = f"  {k:<34} median {m * 1e3:10.3f} ms  (min {min(times[k]) * 1e3:.3f}, " \
               f"n={len(times[k])})"
        if k != ref:
            line += f"  speedup vs {ref}: {med[ref] / m:.2f}x"
        print(line)
    if extra:
        print("  " + extra)
    for k in times:
        if k != ref:   # ratio of adjacent samples: robust to drift in the machine's load
            r = statistics.median(a / b for a, b in zip(times[ref], times[k]))
            print(f"  median of paired ratios {ref} / {k}: {r:.2f}x")
    return {k: {"median_s": m, "min_s": min(times[k]), "n": len(times[k])}
            for k, m in med.items()}


def bench_dense(shapes, repeats, title):
    n = sum(torch.Size(s).numel() for s in shapes)
    kw = dict(lr=1e-4, weight_decay=0.1)
    pa, oa = make_dense(shapes, fat.AdamW, **kw)
    pb, ob = make_dense(shapes, torch.optim.AdamW, fused=True, **kw)
    oa.step()   # create the state, then time the raw functional call on the same buffers
    sts = [oa.state[p] for p in pa]
    arrs = ([p.detach().numpy() for p in pa], [p.grad.numpy() for p in pa],
            [s["exp_avg"].numpy() for s in sts], [s["exp_avg_sq"].numpy() for s in sts])

    def functional():
        fastadam.functional.adamw(*arrs, steps=10, lr=1e-4, weight_decay=0.1)

    fns = {"fastadam.torch.AdamW": oa.step, "torch.optim.AdamW(fused=True)": ob.step,
           "fastadam.functional.adamw (numpy)": functional}
    if n < 10**6:
        pc, oc = make_dense(shapes, torch.optim.AdamW, foreach=True, **kw)
        pd, od = make_dense(shapes, torch.optim.AdamW, foreach=False, **kw)
        fns["torch.optim.AdamW(foreach=True)"] = oc.step
        fns["torch.optim.AdamW(foreach=False)"] = od.step
    times = interleaved(fns, repeats)
    gbs = 28 * n / statistics.median(times["fastadam.torch.AdamW"]) / 1e9
    res = report(f"{title}: {len(shapes)} tensors, {n / 1e6:.2f}M params, fp32 AdamW", times,
                 "torch.optim.AdamW(fused=True)",
                 extra=f"fastadam effective traffic: {gbs:.1f} GB/s (28 bytes/element)")
    del pa, pb, oa, ob
    gc.collect()
    return {"tensors": len(shapes), "params": n, "times": res}


def bench_sparse(repeats, rows=1_000_000, dim=128, batch=4096, window=4, negatives=5):
    """Skip-gram with negative sampling: each step touches the context/negative rows of
    the output table -- batch * (window + negatives) ids, Zipf-distributed (duplicates)."""
    g = torch.Generator().manual_seed(0)
    k = batch * (window + negatives)
    # Zipf-like ids: frequent words repeat within a batch, as in real text
    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    ids = torch.multinomial(probs / probs.sum(), k, replacement=True, generator=g)
    res = {}
    emb_a = torch.nn.Embedding(rows, dim, sparse=True)
    emb_b = torch.nn.Embedding(rows, dim, sparse=True)
    with torch.no_grad():
        emb_b.weight.copy_(emb_a.weight)
    w = torch.randn(k, dim, generator=g)
    for e in (emb_a, emb_b):
        (e(ids) * w).sum().backward()    # uncoalesced sparse grad, k rows
    oa = fat.SparseAdam(emb_a.parameters(), lr=1e-3)
    ob = torch.optim.SparseAdam(emb_b.parameters(), lr=1e-3)
    times = interleaved({"fastadam.torch.SparseAdam": oa.step,
                         "torch.optim.SparseAdam": ob.step}, repeats)
    uniq = int(torch.unique(ids).numel())
    res = report(f"sparse skip-gram: table {rows}x{dim} fp32, {k} ids/step "
                 f"({uniq} distinct)", times, "torch.optim.SparseAdam")
    diff = (emb_a.weight - emb_b.weight).abs().max().item()
    print(f"  max |param diff| after {repeats + 2} identical steps: {diff:.3g}")
    return {"rows": rows, "dim": dim, "ids_per_step": k, "distinct": uniq, "times": res,
            "max_abs_diff": diff}


def bench_mixed(repeats, rows=1_000_000, dim=64, batch=2048, bag=20):
    """Recommender-like model: a sparse EmbeddingBag table plus a dense MLP. fastadam: ONE
    Adam over everything; torch: Adam(fused=True) for the MLP + SparseAdam for the table."""
    g = torch.Generator().manual_seed(0)

    def model():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({
            "emb": torch.nn.EmbeddingBag(rows, dim, mode="sum", sparse=True),
            "mlp": torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.ReLU(),
                                       torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                       torch.nn.Linear(1024, 1))})

    ranks = torch.arange(1, rows + 1, dtype=torch.float64)
    ids = torch.multinomial(1.0 / ranks, batch * bag, replacement=True, generator=g)
    ids = ids.view(batch, bag)
    ma, mb = model(), model()
    for m in (ma, mb):
        m["mlp"](m["emb"](ids)).sum().backward()
    oa = fat.Adam(ma.parameters(), lr=1e-3)
    od = torch.optim.Adam(mb["mlp"].parameters(), lr=1e-3, fused=True)
    osp = torch.optim.SparseAdam(mb["emb"].parameters(), lr=1e-3)

    def torch_pair():
        od.step()
        osp.step()

    times = interleaved({"fastadam.torch.Adam (one optimizer)": oa.step,
                         "torch Adam(fused) + SparseAdam": torch_pair}, repeats)
    nd = sum(p.numel() for p in ma["mlp"].parameters())
    res = report(f"mixed: EmbeddingBag {rows}x{dim} (sparse grads, {batch * bag} ids) + MLP "
                 f"({nd / 1e6:.2f}M dense params)", times, "torch Adam(fused) + SparseAdam")
    return {"rows": rows, "dim": dim, "ids_per_step": batch * bag, "dense_params": nd,
            "times": res}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["gpt2", "tiny", "sparse", "mixed", "all"], nargs="?",
                    default="all")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for both torch and fastadam (default: their defaults)")
    ap.add_argument("--wait-idle", type=float, default=0,
                    help="seconds to wait for an idle machine before each benchmark")
    a = ap.parse_args()
    global WAIT_IDLE
    WAIT_IDLE = a.wait_idle
    if a.threads:
        torch.set_num_threads(a.threads)
        fastadam.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, fastadam {fastadam.__version__}, "
          f"torch threads {torch.get_num_threads()}, fastadam threads "
          f"{fastadam.get_num_threads()}, kernels {fastadam.isa}")
    out = {}
    if a.what in ("tiny", "all"):
        out["tiny"] = bench_dense([(16,)] * 148, a.repeats or 200, "overhead (tiny tensors)")
    if a.what in ("gpt2", "all"):
        out["gpt2"] = bench_dense(gpt2_small_shapes(), a.repeats or 9, "GPT-2 small")
    if a.what in ("sparse", "all"):
        out["sparse"] = bench_sparse(a.repeats or 30)
    if a.what in ("mixed", "all"):
        out["mixed"] = bench_mixed(a.repeats or 30)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
