"""Design: the scenarios; each returns a list of result records (dicts).

What: ``dense`` (one array), ``overhead`` (16 elements: the Python layer),
``many`` (model parameter shapes through the numpy API), ``torch`` (the
``fastadam.torch`` drop-ins vs ``torch.optim`` through ``opt.step()`` on model
shapes, 148 small tensors, one tensor), ``train`` (a whole training step of small
``torch.nn`` models, incl. the step fused into backward) and ``backward-memory``
(its peak memory vs the usual loop; both in :mod:`fastadam.bench.train`),
``sparse`` (embedding rows; options:
pre-merged ids, cycling batches, thread counts), ``torch-sparse`` (skip-gram
SparseAdam and a mixed Embedding+MLP model at the torch level), ``isa``
(the ISA modules side by side), ``threshold`` (serial vs 2-thread
crossover), ``precision`` (16-bit dtype combinations, :mod:`fastadam.bench.precision`),
``q8`` (8-bit state, :mod:`fastadam.bench.q8`) and, on request only, ``soak``
(memory flat over many steps and optimizers, :mod:`fastadam.bench.soak`).

Method: every implementation of a case runs in this process on the same
buffers, interleaved by ``timing.measure`` (medians, min/max, re-measured
when noisy); large cases interleave the bandwidth probes too, and a case
whose figure is above the bandwidth bound is re-measured (``bound``). Only
fastadam's public and functional API is called (the kernels' calling
convention is private): the ``isa`` scenario runs each ISA module in a
worker process with ``FASTADAM_ISA`` set (``worker``).

Record fields common to all: ``scenario, impl, dtype, threads, median_s,
min_s, max_s, inner, repeats``; bandwidth-bound ones add ``n`` or the
workload, ``gbs, working_set`` (and ``report.finalize`` adds ``bound_gbs,
bound_status, pct_bound``); ``report.add_speedups`` adds ``vs_best_peer``.
"""
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from . import bound as B
from . import peers as P
from . import precision as PR
from . import q8 as _q8
from . import timing
from . import train as T
from .machine import bound_for, note_bound
from .q8 import PEERS as Q8_PEERS  # noqa: F401  (cli's --peers)

if TYPE_CHECKING:
    from .cli import Run

BYTES_PER_ELEM = {"float32": 28, "float64": 56}  # read p,g,m,v + write p,m,v


def interleave(cases, **kw):
    return timing.measure(cases, retries=_RUN.retries if _RUN else 1, **kw)


_RUN: Optional["Run"] = None  # the run in progress (set by cli.main)


def _rec(scenario, impl, res, **kw):
    r = {"scenario": scenario, "impl": impl, "median_s": res["median"], "min_s": res["min"],
         "max_s": res["max"], "inner": res["inner"], "repeats": len(res["samples"]),
         "attempts": res.get("attempts", 1), "spread": res.get("spread"),
         "others_cpu": res.get("others_cpu")}
    r.update(kw)
    return r


PROBE_MIN_BYTES = 200 * 2**20  # cases moving more than this interleave bandwidth probes


def add_probes(run, cases, t, nbytes):
    """Add the bandwidth probes to an interleaved set when the case is large
    (the bound is then re-measured side by side, not minutes earlier)."""
    if run.probe is None or nbytes < PROBE_MIN_BYTES and run.mode != "smoke":
        return {}
    pc = run.probe.cases(t, run.probe.INTERLEAVED)
    for name, (fn, _) in pc.items():
        cases[f"probe:{name}"] = fn
    return {f"probe:{k}": b for k, (_, b) in pc.items()}


def take_probes(res, probes):
    """Remove probe timings from ``res``; return {probe: GB/s}."""
    got = {}
    for name, nbytes in probes.items():
        rr = res.pop(name, None)
        if rr:
            got[name[6:]] = nbytes / rr["median"] / 1e9
    return got


def measure_case(run, cases, t, nbytes, working_set, *, repeats, warmup=1, label="",
                 probe_bytes=None):
    """Time ``cases`` (interleaved with the bandwidth probes when the case is
    large) for ``t`` threads -- call inside ``peers.threads(t)``. Each call
    moves ``nbytes`` (a dict per impl, or one number for all). An
    implementation whose figure is above the run's bound while its
    ``working_set`` exceeds the cache is impossible: the case is re-measured,
    ``bound.RETRIES`` times at most (``report.finalize`` marks what stays
    impossible ``disturbed``)."""
    probes = add_probes(run, cases, t, nbytes if probe_bytes is None else probe_bytes)
    for attempt in range(1 + B.RETRIES):
        res = interleave(cases, repeats=repeats, target_s=run.target_s,
                         warmup=warmup if attempt == 0 else 0)
        note_bound(run.bw, t, take_probes(res, probes))
        nb = nbytes if isinstance(nbytes, dict) else {k: nbytes for k in res}
        bad = B.impossible({k: nb[k] / r["median"] / 1e9 for k, r in res.items() if k in nb},
                           bound_for(run.bw, t), working_set, run.llc)
        if not bad or attempt == B.RETRIES:
            break
        run.log(f"  {label}: {', '.join(bad)} above the bandwidth bound "
                f"({bound_for(run.bw, t):.1f} GB/s): disturbed, re-measuring")
    for r in res.values():
        r["bound_attempts"] = attempt + 1
    return res


def _dense_fields(r, n, dtype, threads, run):
    bpe = BYTES_PER_ELEM[dtype]
    t = r["median_s"]
    r.update(n=n, ns_per_elem=t / n * 1e9, gbs=bpe * n / t / 1e9, bytes_per_elem=bpe,
             working_set=4 * n * np.dtype(dtype).itemsize)
    return r


def _cleanup():
    for opt in P._DS_CACHE.values():  # drop DeepSpeed's references to old buffers
        opt.state.clear()
    gc.collect()


def _peer_names(run, default):
    return [p for p in default if run.peers is None or p in run.peers]


# --------------------------------------------------------------------------
# dense single array
# --------------------------------------------------------------------------

DENSE_PEERS = ("fastadam", "fastadam.torch", "torch", "torch-foreach", "torch-fused",
               "deepspeed", "numpy-ref")


def dense(run):
    out = []
    names = _peer_names(run, DENSE_PEERS)
    for variant, sizes in run.dense_variants:
        for dtype in run.dtypes:
            for t in run.threads:
                for n in sizes:
                    run.progress.update(f"dense {variant} {dtype} n=2**{math.log2(n):.4g} t={t}")
                    case = P.Dense([n], dtype, t, variant=variant)
                    with P.threads(t):
                        cases = P.build(names, case, log=run.log, skipped=run.skipped)
                        res = measure_case(run, cases, t, BYTES_PER_ELEM[dtype] * n,
                                           case.nbytes_state, repeats=run.repeats_for(n),
                                           label=f"dense n={n} t={t}")
                    for impl, rr in res.items():
                        r = _rec("dense", impl, rr, variant=variant, dtype=dtype, threads=t)
                        out.append(_dense_fields(r, n, dtype, t, run))
                    del cases
                    case.free()
                    _cleanup()
    return out


def dense_steps(run):
    return sum(len(s) for _, s in run.dense_variants) * len(run.dtypes) * len(run.threads)


# --------------------------------------------------------------------------
# per-call overhead (16 elements)
# --------------------------------------------------------------------------

OVERHEAD_PEERS = ("fastadam", "fastadam-plan", "fastadam.Adam", "fastadam.torch", "torch",
                  "torch-foreach", "torch-fused", "deepspeed", "numpy-ref")


def overhead(run):
    names = [n for n in OVERHEAD_PEERS if run.peers is None or n in run.peers
             or (n == "fastadam-plan" and "fastadam" in run.peers)]
    out = []
    n = 16
    for dtype in run.dtypes:
        t = max(run.threads)
        run.progress.update(f"overhead {dtype}")
        case = P.Dense([n], dtype, t)
        with P.threads(t):
            cases = P.build(names, case, log=run.log, skipped=run.skipped)
            res = interleave(cases, repeats=run.repeats, target_s=run.target_s, warmup=1)
        for impl, rr in res.items():
            r = _rec("overhead", impl, rr, dtype=dtype, threads=t, n=n,
                     us_per_call=rr["median"] * 1e6)
            out.append(r)
        case.free()
        _cleanup()
    return out


# --------------------------------------------------------------------------
# many arrays: real model parameter shapes
# --------------------------------------------------------------------------

def gpt2_small_shapes(d=768, v=50257, ctx=1024, L=12):
    """GPT-2 small (124M): 148 parameter arrays, as in HF GPT2LMHeadModel (tied head);
    other widths ``d``, vocabularies ``v``, contexts ``ctx``, depths ``L`` alike."""
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d)]
    for _ in range(L):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def bert_base_shapes():
    """BERT-base (uncased, 110M): 199 arrays, as in HF BertModel with pooler."""
    d, v, ctx, L, ff = 768, 30522, 512, 12, 3072
    shapes: list[tuple[int, ...]] = [(v, d), (ctx, d), (2, d), (d,), (d,)]
    for _ in range(L):
        shapes += [(d, d), (d,)] * 4 + [(d,), (d,), (ff, d), (ff,), (d, ff), (d,), (d,), (d,)]
    shapes += [(d, d), (d,)]
    return shapes


def tiny_shapes():
    """A toy model for smoke runs: 10 arrays, ~0.1M params."""
    return [(1000, 64), (64,), (64, 256), (256,), (256, 64), (64,), (64,), (64,), (64, 10), (10,)]


MODELS = {"gpt2-small": gpt2_small_shapes, "bert-base": bert_base_shapes, "tiny": tiny_shapes}
MANY_PEERS = ("fastadam.Adam", "fastadam", "fastadam.torch", "torch", "torch-foreach",
              "torch-fused", "deepspeed")


def many(run):
    out = []
    names = [n for n in MANY_PEERS if run.peers is None or n in run.peers]
    for model in run.models:
        shapes = MODELS[model]()
        for dtype in run.dtypes_many:
            for t in run.threads_many:
                run.progress.update(f"many {model} {dtype} t={t}")
                case = P.Dense(None, dtype, t, shapes=shapes)
                with P.threads(t):
                    cases = P.build(names, case, log=run.log, skipped=run.skipped)
                    res = measure_case(run, cases, t, BYTES_PER_ELEM[dtype] * case.n,
                                       case.nbytes_state, repeats=max(3, run.repeats // 2 + 1),
                                       warmup=0, label=f"many {model} t={t}")
                for impl, rr in res.items():
                    r = _rec("many", impl, rr, model=model, arrays=len(shapes), dtype=dtype,
                             threads=t, ms_per_step=rr["median"] * 1e3)
                    out.append(_dense_fields(r, case.n, dtype, t, run))
                del cases
                case.free()
                _cleanup()
    return out


# --------------------------------------------------------------------------
# sparse embedding
# --------------------------------------------------------------------------

def zipf_ids(rng, n_rows, k, a):
    """k ids in [0, n_rows): Zipf(a) ranks (a <= 0: uniform) scattered over the
    table by a random permutation, so hot rows are not adjacent."""
    if a <= 0:
        return rng.integers(0, n_rows, k, dtype=np.int64)
    if a <= 1.0:
        # numpy's zipf needs a > 1; use a bounded power law via inverse CDF
        w = 1.0 / np.arange(1, n_rows + 1, dtype=np.float64) ** a
        c = np.cumsum(w)
        ranks = np.searchsorted(c, rng.random(k) * c[-1])
    else:
        ranks = rng.zipf(a, k) - 1
        bad = ranks >= n_rows
        while bad.any():
            ranks[bad] = rng.zipf(a, int(bad.sum())) - 1
            bad = ranks >= n_rows
    perm = rng.permutation(n_rows)
    return perm[ranks].astype(np.int64)


class SparseCase:
    """A table, its state and a batch of ids (Zipf) with their gradient rows;
    ``cycling`` > 0 adds that many further batches, stepped in turn (the
    touched rows and grads are then cold in the caches)."""

    def __init__(self, rows, dim, batch, zipf, dtype, threads, seed=0, cycling=0):
        rng = np.random.default_rng(seed)
        self.rows, self.dim, self.batch, self.zipf = rows, dim, batch, zipf
        self.dtype = np.dtype(dtype)
        self.threads = threads
        self.table = np.empty((rows, dim), self.dtype)
        block = rng.standard_normal((min(rows, 4096), dim)).astype(self.dtype)
        for lo in range(0, rows, block.shape[0]):
            hi = min(rows, lo + block.shape[0])
            self.table[lo:hi] = block[: hi - lo]
        self.m = np.zeros_like(self.table)
        self.v = np.zeros_like(self.table)
        self.idx = zipf_ids(rng, rows, batch, zipf)
        self.grad = rng.standard_normal((batch, dim)).astype(self.dtype)
        # pre-merged (unique ids, summed rows): to measure the cost of merging duplicates
        self.uidx, self.ugrad = _premerged(self.idx, self.grad)
        self.unique = int(self.uidx.size)
        self.cycle = [(zipf_ids(rng, rows, batch, zipf),
                       rng.standard_normal((batch, dim)).astype(self.dtype))
                      for _ in range(cycling)]
        self.rng = rng
        isz = self.dtype.itemsize
        # touched rows: read p, m, v and write them back; read the grad rows and ids
        self.bytes = self.unique * dim * isz * 6 + batch * dim * isz + batch * 8
        self.working_set = self.unique * dim * isz * 3 + batch * dim * isz + batch * 8


def _premerged(idx, grad):
    """``(unique ids, their summed rows)``: a batch with its merge done."""
    uidx, inv = np.unique(idx, return_inverse=True)
    ugrad = np.zeros((uidx.size, grad.shape[1]), grad.dtype)
    np.add.at(ugrad, inv, grad)
    return uidx, ugrad


def _sp_fastadam(pre_merged=False, cycling=False):
    def make(c):
        fa = P.fastadam_mod()
        f = getattr(fa, "sparse_adam_step", None)
        if f is None:
            raise P.Skip("fastadam.sparse_adam_step is not in this build yet (issue 4)")
        if cycling and not c.cycle:
            raise P.Skip("fastadam-cycling runs with --sparse-batches cycling")
        idx, grad = (c.uidx, c.ugrad) if pre_merged else (c.idx, c.grad)
        st = {"step": 0}
        nt = c.threads
        batches = [_premerged(i, g) for i, g in c.cycle] if pre_merged and cycling else c.cycle

        def step():
            st["step"] += 1
            f(c.table, idx, grad, c.m, c.v, step=st["step"], lr=P.LR, n_threads=nt)

        def step_cycling():
            st["step"] += 1
            i, g = batches[st["step"] % len(batches)]
            f(c.table, i, g, c.m, c.v, step=st["step"], lr=P.LR, n_threads=nt)
        fn = step_cycling if cycling else step
        fn()
        return fn
    return make


def _sp_fastadam_q8(cycling=False):
    """fastadam's sparse step with 8-bit row state (its own state, created here)."""
    def make(c):
        F: Any = getattr(P.fastadam_mod(), "functional", None)
        f = getattr(F, "sparse_adam8bit_step", None)
        if f is None:
            raise P.Skip("fastadam.functional.sparse_adam8bit_step is not in this build yet")
        if c.dtype != np.float32:
            raise P.Skip("8-bit row state is for float32 tables")
        if cycling and not c.cycle:
            raise P.Skip("fastadam-q8-cycling runs with --sparse-batches cycling")
        q8 = F.new_sparse_state8bit(c.table.shape)
        st = {"step": 0}
        nt = c.threads

        def step():
            st["step"] += 1
            i, g = c.cycle[st["step"] % len(c.cycle)] if cycling else (c.idx, c.grad)
            f(c.table, i, g, **q8, step=st["step"], lr=P.LR, n_threads=nt)
        step()
        return step
    return make


# the dense-equivalent mode, measured in the steady state of a long run
DENSE_EQ_STEPS = 10_000


def stream_gaps(rng, n_rows, batch, zipf, steps=DENSE_EQ_STEPS):
    """Per Zipf rank, a draw of the steps since the row was last touched in a
    batch stream that has run ``steps`` steps (geometric with the rank's
    probability of appearing in a batch, capped at ``steps - 1``)."""
    if zipf <= 0:
        pr = np.full(n_rows, 1.0 / n_rows)
    else:
        w = 1.0 / np.arange(1, n_rows + 1, dtype=np.float64) ** zipf
        pr = w / w.sum()
    pin = -np.expm1(batch * np.log1p(-np.minimum(pr, 1 - 1e-16)))
    return np.minimum(rng.geometric(np.maximum(pin, 1e-15)), steps - 1).astype(np.int64)


def _sp_dense_equivalent(c):
    """fastadam's dense-equivalent mode over the batch stream, each touched row
    with the gap it would have at step DENSE_EQ_STEPS of a long run (rows by
    how often the batches touch them: the hot ones come back every step)."""
    from fastadam.functional import CatchUpHistory, sparse_adam_catchup_step
    if not c.cycle:
        raise P.Skip("fastadam-dense-equiv runs with --sparse-batches dense")
    hist = CatchUpHistory(weight_decay=0.01)
    for _ in range(DENSE_EQ_STEPS):
        hist.append(P.LR)
    last = np.full(c.rows, DENSE_EQ_STEPS - 1, np.int64)
    cnt = np.zeros(c.rows, np.int64)
    for i, _ in c.cycle:
        np.add.at(cnt, i, 1)
    gap = np.empty(c.rows, np.int64)
    gap[np.argsort(-cnt, kind="stable")] = np.sort(stream_gaps(c.rng, c.rows, c.batch, c.zipf))
    st = {"i": 0}
    batches = c.cycle
    nt = c.threads

    def step():
        i, g = batches[st["i"] % len(batches)]
        st["i"] += 1
        hist.append(P.LR)
        t = hist.step
        last[i] = t - 1 - np.minimum(gap[i], t - 1)   # the row's gap in a long run
        sparse_adam_catchup_step(c.table, i, g, c.m, c.v, last, hist, n_threads=nt)
    step()
    return step


def _sp_torch_cycling(c):
    """torch.optim.SparseAdam over the same batch stream as fastadam-cycling."""
    torch, tp = _sp_torch_param(c)
    if not c.cycle:
        raise P.Skip("torch-cycling runs with --sparse-batches cycling")
    opt = torch.optim.SparseAdam([tp], lr=P.LR)
    opt.state[tp] = {"step": 0, "exp_avg": torch.from_numpy(c.m),
                     "exp_avg_sq": torch.from_numpy(c.v)}
    grads = [torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(g),
                                     tuple(c.table.shape), check_invariants=False)
             for i, g in c.cycle]
    st = {"i": 0}

    def step():
        tp.grad = grads[st["i"] % len(grads)]
        st["i"] += 1
        opt.step()
    step()
    return step


def _sp_torch_dense(c):
    """torch's own dense equivalent: AdamW(fused=True) over the whole table
    (its gradient, zero but the batch's rows, built once outside the timing)."""
    torch = P.torch_mod()
    tp = torch.nn.Parameter(torch.from_numpy(c.table))
    opt = torch.optim.AdamW([tp], lr=P.LR, weight_decay=0.01, fused=True)
    dense = torch.zeros_like(tp)
    dense.index_add_(0, torch.from_numpy(c.idx), torch.from_numpy(c.grad))
    tp.grad = dense
    opt.step()
    return opt.step


def _sp_fastadam_optim(c):
    fa = P.fastadam_mod()
    cls = getattr(fa, "SparseAdam", None)
    if cls is None:
        raise P.Skip("fastadam.SparseAdam is not in this build yet (issue 4)")
    try:  # share the case's state buffers when the constructor takes them
        opt = cls(c.table, lr=P.LR, exp_avg=c.m, exp_avg_sq=c.v, n_threads=c.threads)
    except TypeError:
        opt = cls(c.table, lr=P.LR)
    opt.step(c.idx, c.grad)
    return lambda: opt.step(c.idx, c.grad)


def _sp_torch_param(c):
    torch = P.torch_mod()
    tp = torch.from_numpy(c.table)
    tidx = torch.from_numpy(c.idx)[None]
    tgrad = torch.from_numpy(c.grad)
    # as nn.Embedding(sparse=True) produces: uncoalesced, one row per id
    tp.grad = torch.sparse_coo_tensor(tidx, tgrad, tuple(c.table.shape),
                                      check_invariants=False)
    return torch, tp


def _sp_torch(c):
    torch, tp = _sp_torch_param(c)
    opt = torch.optim.SparseAdam([tp], lr=P.LR)
    opt.state[tp] = {"step": 0, "exp_avg": torch.from_numpy(c.m),
                     "exp_avg_sq": torch.from_numpy(c.v)}
    opt.step()
    return opt.step


def _sp_fastadam_torch(c):
    fat = P.fastadam_torch()
    if not hasattr(fat, "SparseAdam"):
        raise P.Skip("fastadam.torch has no SparseAdam yet (issue 6)")
    torch, tp = _sp_torch_param(c)
    try:
        opt = fat.SparseAdam([tp], lr=P.LR, n_threads=c.threads)
    except TypeError:
        opt = fat.SparseAdam([tp], lr=P.LR)
    opt.state[tp] = {"step": 0, "exp_avg": torch.from_numpy(c.m),
                     "exp_avg_sq": torch.from_numpy(c.v)}
    try:
        opt.step()
    except Exception:  # its own state layout: let it allocate
        opt.state.clear()
        opt.step()
    return opt.step


def _sp_reference(c):
    from fastadam import _reference as ref
    f = getattr(ref, "sparse_adam", None)
    if f is None:
        raise P.Skip("fastadam._reference.sparse_adam is not in this build yet (issue 4)")
    st = {"step": 0}

    def step():
        st["step"] += 1
        f(c.table, c.idx, c.grad, c.m, c.v, step=st["step"], lr=P.LR)
    step()
    return step


SPARSE = {
    "fastadam": (_sp_fastadam(), "fastadam.sparse_adam_step"),
    "fastadam-premerged": (_sp_fastadam(True), "fastadam.sparse_adam_step, ids pre-merged "
                           "(unique, rows summed): the step without the merge"),
    "fastadam-cycling": (_sp_fastadam(cycling=True), "fastadam.sparse_adam_step over "
                         f"{16} different batches in turn (cold rows; --sparse-batches cycling)"),
    "fastadam-premerged-cycling": (_sp_fastadam(True, cycling=True), "fastadam-cycling's "
                                   "batches pre-merged: the stream's step without the merge"),
    "fastadam-q8": (_sp_fastadam_q8(), "fastadam.functional.sparse_adam8bit_step (8-bit "
                    "row state)"),
    "fastadam-q8-cycling": (_sp_fastadam_q8(True), "fastadam-q8 over fastadam-cycling's "
                            "batches"),
    "fastadam.SparseAdam": (_sp_fastadam_optim, "fastadam.SparseAdam(table).step"),
    "fastadam.torch": (_sp_fastadam_torch, "fastadam.torch.SparseAdam"),
    "torch": (_sp_torch, "torch.optim.SparseAdam"),
    "numpy-ref": (_sp_reference, "fastadam._reference.sparse_adam"),
    "torch-cycling": (_sp_torch_cycling, "torch.optim.SparseAdam over the batch stream "
                      "(--sparse-batches cycling)"),
    "fastadam-dense-equiv": (_sp_dense_equivalent, "fastadam.functional."
                             "sparse_adam_catchup_step over the batch stream, rows with the "
                             f"gaps of step {DENSE_EQ_STEPS:,} of a long run (--sparse-batches "
                             "dense)"),
    "torch-fused-dense": (_sp_torch_dense, "torch.optim.AdamW(fused=True) on the whole table "
                          "(the dense equivalent; --sparse-batches dense)"),
}
# the peers of the batch modes (--sparse-batches)
SPARSE_MODES = {
    "fixed": ("fastadam", "fastadam-premerged", "fastadam-q8", "fastadam.SparseAdam",
              "fastadam.torch", "torch", "numpy-ref"),
    "cycling": ("fastadam-cycling", "fastadam-premerged-cycling", "fastadam-q8-cycling",
                "torch-cycling"),
    "busy": ("fastadam-cycling",),
    "dense": ("fastadam-dense-equiv", "torch-fused-dense"),
}
SPARSE_OURS = tuple(k for k in SPARSE if k.startswith("fastadam"))

CYCLING_BATCHES = 16


def _q8_bytes(c):
    """Touched bytes of a step with 8-bit row state: p (float32) and the m, v
    codes read and written, two float32 scales per block of each touched row
    read and written, the grad rows and ids read."""
    nb = -(-c.dim // 256)
    return (c.unique * (c.dim * (8 + 4) + nb * 16) + c.batch * c.dim * c.dtype.itemsize
            + c.batch * 8)


def _sparse_records(scenario, res, c, dtype, t, **kw):
    out = []
    for impl, rr in res.items():
        tm = rr["median"]
        nbytes = _q8_bytes(c) if impl.startswith("fastadam-q8") else c.bytes
        out.append(_rec(scenario, impl, rr, dtype=dtype, threads=t, rows=c.rows, dim=c.dim,
                        batch=c.batch, zipf=c.zipf, unique_rows=c.unique,
                        touched_elems=c.unique * c.dim, touched_bytes=nbytes,
                        working_set=c.working_set, ms_per_step=tm * 1e3,
                        ns_per_touched_elem=tm / (c.unique * c.dim) * 1e9,
                        gbs=nbytes / tm / 1e9, **kw))
    return out


@contextlib.contextmanager
def busy_core():
    """One core kept busy by another process (a Python spin loop) while inside."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def sparse(run):
    out = []
    for (rows, dim, batch, zipf) in run.sparse_configs:
        for dtype in run.dtypes_sparse:
            for t in run.threads:
                for mode in run.sparse_batches:
                    out += _sparse_mode(run, mode, rows, dim, batch, zipf, dtype, t)
    # 1 vs N threads: the speedup of each implementation from one thread
    one = {(r["rows"], r["dim"], r["batch"], r["zipf"], r["dtype"], r["impl"], r["mode"]): r
           for r in out if r["threads"] == 1}
    for r in out:
        r1 = one.get((r["rows"], r["dim"], r["batch"], r["zipf"], r["dtype"], r["impl"],
                      r["mode"]))
        if r1 is not None and r["threads"] > 1:
            r["vs_1_thread"] = r1["median_s"] / r["median_s"]
    return out


def _sparse_mode(run, mode, rows, dim, batch, zipf, dtype, t):
    """One batch mode of one sparse workload: its peers side by side."""
    names = [n for n in SPARSE_MODES[mode] if run.peers is None or n in run.peers
             or (n.startswith("fastadam-") and "fastadam" in run.peers)]
    if not names:
        return []
    run.progress.update(f"sparse {mode} {rows}x{dim} b={batch} zipf={zipf} t={t}")
    c = SparseCase(rows, dim, batch, zipf, dtype, t,
                   cycling=CYCLING_BATCHES if mode != "fixed" else 0)
    busy = busy_core() if mode == "busy" else contextlib.nullcontext()
    with P.threads(t), busy:
        cases = P.build(names, c, registry=SPARSE, log=run.log, skipped=run.skipped)
        res = measure_case(run, cases, t, c.bytes, c.working_set, repeats=run.repeats,
                           probe_bytes=PROBE_MIN_BYTES, label=f"sparse {mode} t={t}")
    recs = _sparse_records("sparse", res, c, dtype, t, mode=mode, busy_core=mode == "busy")
    if "fastadam" in res and "fastadam-premerged" in res:
        share = 1.0 - res["fastadam-premerged"]["median"] / res["fastadam"]["median"]
        for r in recs:
            if r["impl"] == "fastadam":
                r["merge_share"] = share
    if "fastadam-cycling" in res and "fastadam-premerged-cycling" in res:
        share = 1.0 - (res["fastadam-premerged-cycling"]["median"]
                       / res["fastadam-cycling"]["median"])
        for r in recs:
            if r["impl"] == "fastadam-cycling":
                r["merge_share"] = share
    del cases
    del c
    _cleanup()
    return recs


# --------------------------------------------------------------------------
# torch level: the drop-ins vs torch.optim through opt.step()
# --------------------------------------------------------------------------

def gpt2_w64_shapes():
    """GPT-2's 148 parameter shapes at width 64 (vocab and context 1024): 0.73M params,
    the per-tensor overhead at GPT-2's tensor count with a little arithmetic."""
    return gpt2_small_shapes(d=64, v=1024, ctx=1024)


TORCH_MODELS = {
    "1x16": (lambda: [(16,)], "one tensor of 16 elements (the per-step cost)"),
    "148x16": (lambda: [(16,)] * 148, "148 tensors of 16 elements (GPT-2's count: overhead)"),
    "gpt2-w64": (gpt2_w64_shapes, "GPT-2's 148 shapes at width 64: 0.73M params"),
    "1x2^20": (lambda: [(2**20,)], "one tensor of 2**20 elements"),
    "1x2^24": (lambda: [(2**24,)], "one tensor of 2**24 elements"),
    "gpt2-small": (gpt2_small_shapes, "GPT-2 small: 148 tensors, 124M params"),
    "bert-base": (bert_base_shapes, "BERT-base: 199 tensors, 110M params"),
    "tiny": (tiny_shapes, "10 tensors, ~0.1M params (smoke)"),
}
TORCH_PEERS = ("fastadam.torch", "torch-fused", "torch-foreach", "torch", "deepspeed",
               "fastadam.Adam", "fastadam")


def torch_level(run):
    """``fastadam.torch.AdamW`` vs ``torch.optim.AdamW`` (fused, foreach, single) and
    DeepSpeedCPUAdam: ``opt.step()`` over ``nn.Parameter`` views of the shared
    buffers, the whole optimizer machinery included; ``fastadam.Adam`` (the numpy
    class) and ``fastadam`` (functional.adamw) on the same numpy buffers show what
    the drop-in adds."""
    P.fastadam_torch()  # a clear skip when torch is missing
    out = []
    names = [n for n in TORCH_PEERS if run.peers is None or n in run.peers]
    for model in run.torch_models:
        shapes = TORCH_MODELS[model][0]()
        for t in run.threads_many:
            run.progress.update(f"torch {model} t={t}")
            case = P.Dense(None, "float32", t, shapes=shapes, variant="adamw")
            case.as_params = True
            with P.threads(t):
                cases = P.build(names, case, log=run.log, skipped=run.skipped)
                res = measure_case(run, cases, t, BYTES_PER_ELEM["float32"] * case.n,
                                   case.nbytes_state, repeats=max(3, run.repeats // 2 + 1),
                                   warmup=0, label=f"torch {model} t={t}")
            for impl, rr in res.items():
                r = _rec("torch", impl, rr, model=model, arrays=len(shapes), dtype="float32",
                         threads=t, variant="adamw", ms_per_step=rr["median"] * 1e3)
                out.append(_dense_fields(r, case.n, "float32", t, run))
            del cases
            case.free()
            _cleanup()
    return out


def _torch_skipgram(run, rows, dim, batch, zipf, t):
    """Skip-gram with negative sampling: each step touches ``batch`` context +
    negative rows of the output table, Zipf-distributed (duplicates)."""
    names = [n for n in ("fastadam.torch", "torch", "fastadam")
             if run.peers is None or n in run.peers]
    c = SparseCase(rows, dim, batch, zipf, "float32", t)
    with P.threads(t):
        cases = P.build(names, c, registry=SPARSE, log=run.log, skipped=run.skipped)
        res = measure_case(run, cases, t, c.bytes, c.working_set, repeats=run.repeats,
                           probe_bytes=PROBE_MIN_BYTES, label=f"torch-sparse skipgram t={t}")
    recs = _sparse_records("torch-sparse", res, c, "float32", t, workload="skipgram")
    del cases, c
    _cleanup()
    return recs


class MixedCase:
    """A recommender-like model: ``EmbeddingBag(rows, dim, sparse=True)`` and a
    dense MLP (dim -> 1024 -> 1024 -> 1), its gradients from one backward pass
    (set once: a step reads them, never writes them). Both optimizers step the
    same parameters (each with its own state), so memory holds one model."""

    def __init__(self, rows, dim, batch, bag, t, seed=0):
        torch = P.torch_mod()
        self.rows, self.dim, self.batch, self.bag, self.threads = rows, dim, batch, bag, t
        torch.manual_seed(seed)
        nn = torch.nn
        self.emb = nn.EmbeddingBag(rows, dim, mode="sum", sparse=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                 nn.ReLU(), nn.Linear(1024, 1))
        rng = np.random.default_rng(seed)
        ids = torch.from_numpy(zipf_ids(rng, rows, batch * bag, 1.0)).view(batch, bag)
        self.mlp(self.emb(ids)).sum().backward()
        self.unique = int(torch.unique(ids).numel())
        self.dense_n = sum(p.numel() for p in self.mlp.parameters())
        isz = 4
        self.bytes = (BYTES_PER_ELEM["float32"] * self.dense_n
                      + self.unique * dim * isz * 6 + ids.numel() * (dim * isz + 8))
        self.working_set = (4 * self.dense_n * isz + self.unique * dim * isz * 3
                            + ids.numel() * (dim * isz + 8))


def _mixed_fastadam(c):
    fat = P.fastadam_torch()
    opt = fat.Adam(list(c.emb.parameters()) + list(c.mlp.parameters()), lr=P.LR)
    opt.step()
    return opt.step


def _mixed_torch(c):
    torch = P.torch_mod()
    od = torch.optim.Adam(c.mlp.parameters(), lr=P.LR, fused=True)
    osp = torch.optim.SparseAdam(c.emb.parameters(), lr=P.LR)

    def step():
        od.step()
        osp.step()
    step()
    return step


MIXED = {
    "fastadam.torch": (_mixed_fastadam, "fastadam.torch.Adam: one optimizer, dense + sparse"),
    "torch": (_mixed_torch, "torch.optim.Adam(fused=True) for the MLP + SparseAdam for the "
              "table"),
}


def torch_sparse(run):
    """Skip-gram SparseAdam and the mixed Embedding+MLP model at the torch level."""
    P.fastadam_torch()
    out = []
    rows, dim, batch, zipf = run.skipgram
    mrows, mdim, mbatch, mbag = run.mixed
    for t in run.threads:
        run.progress.update(f"torch-sparse skipgram t={t}")
        out += _torch_skipgram(run, rows, dim, batch, zipf, t)
        run.progress.update(f"torch-sparse mixed t={t}")
        names = [n for n in MIXED if run.peers is None or n in run.peers]
        c = MixedCase(mrows, mdim, mbatch, mbag, t)
        with P.threads(t):
            cases = P.build(names, c, registry=MIXED, log=run.log, skipped=run.skipped)
            res = measure_case(run, cases, t, c.bytes, c.working_set, repeats=run.repeats,
                               probe_bytes=PROBE_MIN_BYTES, label=f"torch-sparse mixed t={t}")
        for impl, rr in res.items():
            out.append(_rec("torch-sparse", impl, rr, workload="mixed", dtype="float32",
                            threads=t, rows=mrows, dim=mdim, batch=mbatch * mbag,
                            unique_rows=c.unique, dense_params=c.dense_n,
                            touched_bytes=c.bytes, working_set=c.working_set,
                            ms_per_step=rr["median"] * 1e3, gbs=c.bytes / rr["median"] / 1e9))
        del cases, c
        _cleanup()
    return out


# --------------------------------------------------------------------------
# ISA modules side by side: one worker process per module (FASTADAM_ISA)
# --------------------------------------------------------------------------

def _isa_levels(log):
    from fastadam import _dispatch
    levels = []
    for isa in _dispatch.built_modules():
        ok, why = _dispatch.supported(isa)
        if not ok:
            log(f"skip isa {isa}: {why}")
            continue
        levels.append(isa)
    return levels, _dispatch.ISA


def run_worker(isa, jobs, *, repeats, target_s, retries, timeout=600):
    """Run ``worker`` with ``FASTADAM_ISA=isa`` on ``jobs``; return its JSON."""
    env = dict(os.environ, FASTADAM_ISA=isa)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec = {"jobs": jobs, "repeats": repeats, "target_s": target_s, "retries": retries}
    proc = subprocess.run([sys.executable, "-m", "fastadam.bench.worker"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"isa worker {isa} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)


def _pool(samples_runs):
    """Pool the per-call samples of several worker rounds into one result."""
    s = [x for r in samples_runs for x in r["samples"]]
    import statistics
    return {"median": statistics.median(s), "min": min(s), "max": max(s), "samples": s,
            "inner": samples_runs[0]["inner"], "attempts": sum(r["attempts"] for r in samples_runs),
            "spread": max(s) / min(s), "others_cpu": max(r["others_cpu"] for r in samples_runs)}


def isa(run):
    """Each ISA module's ``fastadam.adam_step`` in its own process
    (``FASTADAM_ISA``), in alternating order over ``run.isa_rounds`` rounds
    (A B C, C B A, ...); the samples of all rounds are pooled."""
    levels, chosen = _isa_levels(run.log)
    jobs = [{"dtype": d, "threads": t, "n": n} for d in run.dtypes for t in run.threads_isa
            for n in run.isa_sizes]
    # isa -> one worker round's results (one per job) per round
    got: dict[str, list[list[dict[str, Any]]]] = {isa: [] for isa in levels}
    for rnd in range(run.isa_rounds):
        for isa in (levels if rnd % 2 == 0 else levels[::-1]):
            run.progress.update(f"isa {isa} round {rnd + 1}")
            got[isa].append(run_worker(isa, jobs, repeats=run.repeats, target_s=run.target_s,
                                       retries=run.retries)["results"])
    out = []
    for j, job in enumerate(jobs):
        res = {f"isa:{isa}": _pool([rs[j] for rs in got[isa]]) for isa in levels}
        base = res.get("isa:baseline", {}).get("median")
        for impl, rr in res.items():
            r = _rec("isa", impl, rr, dtype=job["dtype"], threads=job["threads"],
                     chosen=impl == f"isa:{chosen}")
            if base:
                r["vs_baseline"] = base / rr["median"]
            out.append(_dense_fields(r, job["n"], job["dtype"], job["threads"], run))
    return out


def isa_steps(run):
    return run.isa_rounds * max(1, len(_isa_levels(lambda m: None)[0]))


# --------------------------------------------------------------------------
# serial vs 2-thread crossover (sets fastadam._threads.SERIAL_THRESHOLD)
# --------------------------------------------------------------------------

@contextlib.contextmanager
def uncapped_threads():
    """fastadam gives every thread at least ``SERIAL_THRESHOLD`` elements, even
    for an explicit ``n_threads``; to find where 2 threads start to pay, this
    scenario lifts that floor for its own calls while it runs (the library
    reads no setting for it; see the report)."""
    from fastadam import _threads
    orig = _threads.resolve

    def resolve(n_threads, work, threshold=None):
        return orig(n_threads, work, 1)
    _threads.resolve = resolve
    try:
        yield
    finally:
        _threads.resolve = orig


def _step_call(dtype, arrays, nt):
    fa = P.fastadam_mod()
    p, g, m, v = arrays
    return lambda: fa.adam_step(p, g, m, v, step=10, lr=P.LR, n_threads=nt)


def threshold(run):
    from fastadam import _dispatch
    out = []
    tmax = max(2, max(run.threads))
    for dtype in run.dtypes:
        run.progress.update(f"threshold {dtype}")
        case = P.Dense([max(run.threshold_sizes)], dtype, 1)
        rows = []
        for n in run.threshold_sizes:
            arrays = tuple(x[0][:n] for x in case.buffers())
            cases = {"1 thread": _step_call(dtype, arrays, 1),
                     f"{2} threads": _step_call(dtype, arrays, 2)}
            with P.threads(tmax), uncapped_threads():
                res = interleave(cases, repeats=run.repeats, target_s=run.target_s)
            t1, t2 = res["1 thread"]["median"], res["2 threads"]["median"]
            bad = any(B.noisy(rr) for rr in res.values())
            rows.append((n, t1, t2, bad))
            for impl, rr in res.items():
                r = _rec("threshold", impl, rr, dtype=dtype, isa=_dispatch.ISA,
                         threads=1 if impl.startswith("1") else 2)
                r.update(n=n, ns_per_elem=rr["median"] / n * 1e9, ratio_2_over_1=t2 / t1)
                out.append(r)
        # crossover: the smallest size from which 2 threads win at every larger size,
        # over the sizes whose measurement was not disturbed by other processes
        clean = [row for row in rows if not row[3]] or rows
        cross = None
        for i, (n, _t1, _t2, _) in enumerate(clean):
            if all(b < a for _, a, b, _ in clean[i:]):
                cross = n
                break
        # trust it only if a clean smaller size shows 1 thread winning
        reliable = cross is not None and any(
            n < cross and b >= a for n, a, b, bad in rows if not bad)
        out.append({"scenario": "threshold-summary", "impl": "fastadam", "dtype": dtype,
                    "reliable": reliable,
                    "isa": _dispatch.ISA, "crossover_elems": cross,
                    "suggested_serial_threshold": None if cross is None else cross // 2,
                    "current_serial_threshold": _current_threshold(),
                    "sizes": [r[0] for r in rows],
                    "disturbed_sizes": [r[0] for r in rows if r[3]]})
        case.free()
    return out


def _current_threshold():
    try:
        from fastadam import _threads
        return _threads.SERIAL_THRESHOLD
    except Exception:
        return None


def soak_scenario(run):
    """``soak``: memory flat over 10**5 small steps and 10**3 large ones, optimizers
    created and destroyed (see :mod:`fastadam.bench.soak`); on request only."""
    from . import soak as SK
    try:
        import torch  # noqa: F401  (imported before tracing starts)
    except ImportError:
        pass
    small, large = run.soak_steps
    out = []
    for name, steps, n, block in (("small", small, 256, 200), ("large", large, 2**22, 20)):
        run.progress.update(f"soak {name}")
        out += SK.phase(name, steps, n, block, log=run.log)
    return out


# --------------------------------------------------------------------------
# sparse at scale: a 10M x 128 table in RAM, a memmap table beyond RAM
# --------------------------------------------------------------------------

SCALE_CONFIGS = {
    # name: (rows, dim, where); the memmap's table + state (3 x 10.2 GB float32)
    # exceed this machine's 23 GB of RAM
    "ram": (10_000_000, 128, "ram"),
    "memmap": (20_000_000, 128, "memmap"),
    "small-memmap": (200_000, 16, "memmap"),     # seconds: tests, CI
}
SCALE_BATCH, SCALE_ZIPF, SCALE_BATCHES = 16384, 1.1, 32


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _scale_arrays(name, rows, dim, folder):
    """The table and its state: in RAM (the table filled, the state np.zeros:
    pages appear as rows are touched, as fastadam.SparseAdam allocates it) or
    three sparse files (unwritten rows cost no disk) mapped with np.memmap."""
    if name == "ram":
        table = np.empty((rows, dim), np.float32)
        block = np.random.default_rng(0).standard_normal((4096, dim)).astype(np.float32)
        for lo in range(0, rows, 4096):
            table[lo: lo + 4096] = block[: min(4096, rows - lo)]
        return table, np.zeros_like(table), np.zeros_like(table), []
    paths = []
    arrays = []
    for what in ("table", "exp_avg", "exp_avg_sq"):
        path = os.path.join(folder, f"fastadam-scale-{os.getpid()}-{what}.bin")
        with open(path, "wb") as fh:
            fh.truncate(rows * dim * 4)
        paths.append(path)
        arrays.append(np.memmap(path, dtype=np.float32, mode="r+", shape=(rows, dim)))
    return arrays[0], arrays[1], arrays[2], paths


def sparse_scale(run):
    """``sparse-scale`` (on request): steps on a 10M x 128 table in RAM and on an
    np.memmap table + state beyond RAM; touched rows per second, RSS growth
    over the timed steps and tracemalloc's peak per step (both O(batch))."""
    import tempfile
    import tracemalloc

    import fastadam as fa
    out = []
    rng = np.random.default_rng(1)
    folder = run.scale_dir or tempfile.gettempdir()
    for name in run.sparse_scale:
        rows, dim, where = SCALE_CONFIGS[name]
        run.progress.update(f"sparse-scale {name} {rows:,}x{dim}")
        table, m, v, paths = _scale_arrays(name, rows, dim, folder)
        try:
            batches = [(zipf_ids(rng, rows, SCALE_BATCH, SCALE_ZIPF),
                        rng.standard_normal((SCALE_BATCH, dim)).astype(np.float32))
                       for _ in range(SCALE_BATCHES)]
            uniq = [np.unique(i).size for i, _ in batches]
            for t in run.threads:
                step = 0
                for i, g in batches:            # warm-up: a first pass over the stream
                    step += 1
                    fa.sparse_adam_step(table, i, g, m, v, step=step, n_threads=t)
                rss0 = _rss()
                times = []
                tracemalloc.start()
                for _ in range(3):
                    for i, g in batches:
                        step += 1
                        t0 = time.perf_counter()
                        fa.sparse_adam_step(table, i, g, m, v, step=step, n_threads=t)
                        times.append(time.perf_counter() - t0)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                med = float(np.median(times))
                out.append({"scenario": "sparse-scale", "impl": "fastadam", "config": name,
                            "where": where, "rows": rows, "dim": dim, "batch": SCALE_BATCH,
                            "zipf": SCALE_ZIPF, "dtype": "float32", "threads": t,
                            "median_s": med, "min_s": float(np.min(times)),
                            "max_s": float(np.max(times)), "inner": 1, "repeats": len(times),
                            "ms_per_step": med * 1e3, "unique_rows": int(np.mean(uniq)),
                            "touched_rows_per_s": float(np.mean(uniq)) / med,
                            "table_bytes": rows * dim * 4 * 3,
                            "rss_growth_bytes": _rss() - rss0,
                            "tracemalloc_peak_bytes": peak})
                run.log(f"  sparse-scale {name} t={t}: {med * 1e3:.2f} ms/step, "
                        f"{np.mean(uniq) / med / 1e6:.2f} M touched rows/s, RSS "
                        f"+{(_rss() - rss0) / 2**20:.0f} MiB, tracemalloc peak "
                        f"{peak / 2**20:.1f} MiB")
        finally:
            del table, m, v
            gc.collect()
            for p in paths:
                os.unlink(p)
    return out


# --------------------------------------------------------------------------

# never in a mode's default list: run with --scenario soak (or sparse-scale)
ON_REQUEST = ("soak", "sparse-scale")

SCENARIOS = {
    "dense": (dense, dense_steps, "one array, 2**4..2**26 elements, per dtype and thread count"),
    "overhead": (overhead, lambda run: len(run.dtypes), "per-call cost at 16 elements"),
    "many": (many, lambda run: len(run.models) * len(run.dtypes_many) * len(run.threads_many),
             "model parameter shapes (GPT-2 small 148 arrays/124M, BERT-base 199/110M)"),
    "torch": (torch_level, lambda run: len(run.torch_models) * len(run.threads_many),
              "fastadam.torch.AdamW vs torch.optim.AdamW (fused/foreach/single) through "
              "opt.step(): " + ", ".join(TORCH_MODELS)),
    "sparse": (sparse, lambda run: len(run.sparse_configs) * len(run.dtypes_sparse)
               * len(run.threads), "embedding rows x dim x batch x Zipf exponent; pre-merged "
               "ids, --sparse-batches fixed,cycling, --threads 1,2"),
    "train": (T.train_scenario, lambda run: len(run.train_models) * len(run.threads_many),
              "whole training step (forward + backward + AdamW) of small torch.nn models: "
              "fastadam.torch (usual loop, step_in_backward) vs torch fused/foreach/single"),
    "backward-memory": (T.memory_scenario, lambda run: 2,
                        "peak RSS of a training step: usual loop vs step_in_backward (one "
                        "worker process each)"),
    "torch-sparse": (torch_sparse, lambda run: 2 * len(run.threads),
                     "torch level: skip-gram SparseAdam, mixed EmbeddingBag+MLP (one "
                     "fastadam.torch.Adam vs torch Adam(fused)+SparseAdam)"),
    "isa": (isa, isa_steps, "baseline vs avx2 vs avx512 modules, one process each "
            "(FASTADAM_ISA)"),
    "threshold": (threshold, lambda run: len(run.dtypes),
                  "serial vs 2-thread crossover of the dense kernel"),
    "precision": (PR.precision, PR.steps,
                  "16-bit params/grads/moments, bf16 copy-out, stochastic rounding vs torch "
                  "fused fp32 and bf16/fp16: time, bytes/element, % of bound, state bytes"),
    "sparse-scale": (sparse_scale, lambda run: len(run.sparse_scale) * len(run.threads),
                     "on request only: a 10M x 128 table in RAM and an np.memmap table + state "
                     "beyond RAM (--sparse-scale ram,memmap, --scale-dir DIR)"),
    "q8": (_q8.q8_scenario, _q8.q8_steps, "AdamW with 8-bit state (fastadam.functional."
           "adamw8bit) vs float32 state, torch fused, bitsandbytes and torchao AdamW8bit: "
           "2**24, 2**26, GPT-2 small; time, B/elem, % of bound, state B/param"),
    "soak": (soak_scenario, lambda run: 2,
             "on request only: RSS and tracemalloc flat over 10**5 small + 10**3 large "
             "steps, optimizers (numpy and torch, dense and sparse) created and destroyed; "
             "fails beyond the tolerances (--soak-steps SMALL,LARGE)"),
}
