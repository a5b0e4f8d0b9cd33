"""Scenarios: each returns a list of result records (dicts).

Record fields common to all: ``scenario, impl, dtype, threads, median_s,
min_s, max_s, inner, repeats``; dense ones add ``n, ns_per_elem, gbs,
bound_gbs, pct_bound``; ``report.add_speedups`` adds ``vs_best_peer``.
"""
import gc
import importlib
import math

import numpy as np

from . import peers as P
from .machine import bound_for
from . import timing

BYTES_PER_ELEM = {"float32": 28, "float64": 56}  # read p,g,m,v + write p,m,v


def interleave(cases, **kw):
    return timing.measure(cases, retries=_RUN.retries if _RUN else 1, **kw)


_RUN = None


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
    (its own bound is then measured side by side, not minutes earlier)."""
    if run.probe is None or nbytes < PROBE_MIN_BYTES and run.mode != "smoke":
        return {}
    pc = run.probe.cases(t, run.probe.INTERLEAVED)
    for name, (fn, _) in pc.items():
        cases[f"probe:{name}"] = fn
    return {f"probe:{k}": b for k, (_, b) in pc.items()}


def take_probes(res, probes):
    """Remove probe timings from ``res``; return (bound GB/s, {probe: GB/s})."""
    got = {}
    for name, nbytes in probes.items():
        rr = res.pop(name, None)
        if rr:
            got[name[6:]] = nbytes / rr["median"] / 1e9
    return (max(got.values()) if got else None), got


def _bound(r, run, threads, interleaved):
    bound, got = interleaved
    if bound:
        r.update(bound_gbs=bound, bound_source="interleaved", probe_gbs=got)
    elif run.bw:
        r.update(bound_gbs=bound_for(run.bw, threads), bound_source="start of run")
    return r.get("bound_gbs")


def _dense_fields(r, n, dtype, threads, run, interleaved=(None, {})):
    bpe = BYTES_PER_ELEM[dtype]
    t = r["median_s"]
    bound = _bound(r, run, threads, interleaved)
    r.update(n=n, ns_per_elem=t / n * 1e9, gbs=bpe * n / t / 1e9, bytes_per_elem=bpe)
    if bound:
        r.update(pct_bound=100.0 * bpe * n / t / 1e9 / bound, bound_ns_per_elem=bpe / bound)
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
                        probes = add_probes(run, cases, t, BYTES_PER_ELEM[dtype] * n)
                        res = interleave(cases, repeats=run.repeats_for(n),
                                         target_s=run.target_s, warmup=1)
                    ib = take_probes(res, probes)
                    for impl, rr in res.items():
                        r = _rec("dense", impl, rr, variant=variant, dtype=dtype, threads=t)
                        out.append(_dense_fields(r, n, dtype, t, run, ib))
                    del cases
                    case.free()
                    _cleanup()
    return out


def dense_steps(run):
    return sum(len(s) for _, s in run.dense_variants) * len(run.dtypes) * len(run.threads)


# --------------------------------------------------------------------------
# per-call overhead (16 elements)
# --------------------------------------------------------------------------

def _kernel_floor(case):
    """The ISA module's adam32/64 called directly: the floor under any wrapper."""
    from fastadam import _dispatch
    from fastadam.functional import adam_scalars
    k = _dispatch.kernels
    f = k.adam32 if case.dtype == np.float32 else k.adam64
    p, g, m, v = case.p[0], case.g[0], case.m[0], case.v[0]
    nss, bc2s = adam_scalars(10, P.LR, 0.9, 0.999)
    args = (p, g, m, v, None, nss, bc2s, 1.0, 1.0, 1.0, 0.0, 0.1, 0.001, 0.999, 1e-8,
            False, False, 1)
    return lambda: f(*args)


OVERHEAD_PEERS = ("fastadam", "fastadam-kernel", "fastadam.Adam", "fastadam.torch", "torch",
                  "torch-foreach", "torch-fused", "deepspeed", "numpy-ref")


def overhead(run):
    reg = dict(P.DENSE)
    reg["fastadam-kernel"] = (_kernel_floor, "fastadam kernel module called directly (floor)")
    names = [n for n in OVERHEAD_PEERS if run.peers is None or n in run.peers
             or (n == "fastadam-kernel" and "fastadam" in run.peers)]
    out = []
    n = 16
    for dtype in run.dtypes:
        t = max(run.threads)
        run.progress.update(f"overhead {dtype}")
        case = P.Dense([n], dtype, t)
        with P.threads(t):
            cases = P.build(names, case, registry=reg, log=run.log, skipped=run.skipped)
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

def gpt2_small_shapes():
    """GPT-2 small (124M): 148 parameter arrays, as in HF GPT2LMHeadModel (tied head)."""
    d, v, ctx, L = 768, 50257, 1024, 12
    shapes = [(v, d), (ctx, d)]
    for _ in range(L):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,),
                   (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def bert_base_shapes():
    """BERT-base (uncased, 110M): 199 arrays, as in HF BertModel with pooler."""
    d, v, ctx, L, ff = 768, 30522, 512, 12, 3072
    shapes = [(v, d), (ctx, d), (2, d), (d,), (d,)]
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
                    probes = add_probes(run, cases, t, BYTES_PER_ELEM[dtype] * case.n)
                    res = interleave(cases, repeats=max(3, run.repeats // 2 + 1),
                                     target_s=run.target_s, warmup=0)
                ib = take_probes(res, probes)
                for impl, rr in res.items():
                    r = _rec("many", impl, rr, model=model, arrays=len(shapes), dtype=dtype,
                             threads=t, ms_per_step=rr["median"] * 1e3)
                    out.append(_dense_fields(r, case.n, dtype, t, run, ib))
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
    def __init__(self, rows, dim, batch, zipf, dtype, threads, seed=0):
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
        self.uidx, inv = np.unique(self.idx, return_inverse=True)
        self.ugrad = np.zeros((self.uidx.size, dim), self.dtype)
        np.add.at(self.ugrad, inv, self.grad)
        self.unique = int(self.uidx.size)
        isz = self.dtype.itemsize
        # touched rows: read p, m, v and write them back; read the grad rows and ids
        self.bytes = self.unique * dim * isz * 6 + batch * dim * isz + batch * 8


def _sp_fastadam(pre_merged=False):
    def make(c):
        fa = P.fastadam_mod()
        f = getattr(fa, "sparse_adam_step", None)
        if f is None:
            raise P.Skip("fastadam.sparse_adam_step is not in this build yet (issue 4)")
        idx, grad = (c.uidx, c.ugrad) if pre_merged else (c.idx, c.grad)
        st = {"step": 0}
        nt = c.threads

        def step():
            st["step"] += 1
            f(c.table, idx, grad, c.m, c.v, step=st["step"], lr=P.LR, n_threads=nt)
        step()
        return step
    return make


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
    "fastadam-premerged": (_sp_fastadam(True), "fastadam.sparse_adam_step, ids pre-merged"),
    "fastadam.SparseAdam": (_sp_fastadam_optim, "fastadam.SparseAdam(table).step"),
    "fastadam.torch": (_sp_fastadam_torch, "fastadam.torch.SparseAdam"),
    "torch": (_sp_torch, "torch.optim.SparseAdam"),
    "numpy-ref": (_sp_reference, "fastadam._reference.sparse_adam"),
}
SPARSE_OURS = ("fastadam", "fastadam-premerged", "fastadam.SparseAdam", "fastadam.torch")


def sparse(run):
    out = []
    names = [n for n in SPARSE if run.peers is None or n in run.peers
             or (n == "fastadam-premerged" and "fastadam" in run.peers)]
    for (rows, dim, batch, zipf) in run.sparse_configs:
        for dtype in run.dtypes_sparse:
            for t in run.threads:
                run.progress.update(f"sparse {rows}x{dim} b={batch} zipf={zipf} t={t}")
                c = SparseCase(rows, dim, batch, zipf, dtype, t)
                with P.threads(t):
                    cases = P.build(names, c, registry=SPARSE, log=run.log,
                                    skipped=run.skipped)
                    probes = add_probes(run, cases, t, PROBE_MIN_BYTES)
                    res = interleave(cases, repeats=run.repeats, target_s=run.target_s,
                                     warmup=1)
                ib = take_probes(res, probes)
                for impl, rr in res.items():
                    tm = rr["median"]
                    r = _rec("sparse", impl, rr, dtype=dtype, threads=t, rows=rows, dim=dim,
                             batch=batch, zipf=zipf, unique_rows=c.unique,
                             touched_elems=c.unique * dim, touched_bytes=c.bytes,
                             ms_per_step=tm * 1e3,
                             ns_per_touched_elem=tm / (c.unique * dim) * 1e9,
                             gbs=c.bytes / tm / 1e9)
                    bound = _bound(r, run, t, ib)
                    if bound:
                        r.update(bound_gbs=bound, pct_bound=100 * c.bytes / tm / 1e9 / bound,
                                 bound_ms=c.bytes / bound / 1e6)
                    out.append(r)
                if "fastadam" in res and "fastadam-premerged" in res:
                    share = 1.0 - res["fastadam-premerged"]["median"] / res["fastadam"]["median"]
                    for r in out[-len(res):]:
                        if r["impl"] == "fastadam":
                            r["merge_share"] = share
                del cases
                del c
                _cleanup()
    return out


# --------------------------------------------------------------------------
# ISA modules side by side (direct kernel calls)
# --------------------------------------------------------------------------

def _isa_modules(log):
    from fastadam import _dispatch
    mods = {}
    for isa in _dispatch.built_modules():
        ok, why = _dispatch.supported(isa)
        if not ok:
            log(f"skip isa {isa}: {why}")
            continue
        mods[isa] = importlib.import_module(f"fastadam._kernels_{isa}")
    return mods, _dispatch.ISA


def _kernel_call(mod, dtype, arrays, nt):
    from fastadam.functional import adam_scalars
    f = mod.adam32 if dtype == "float32" else mod.adam64
    p, g, m, v = arrays
    nss, bc2s = adam_scalars(10, P.LR, 0.9, 0.999)
    args = (p, g, m, v, None, nss, bc2s, 1.0, 1.0, 1.0, 0.0, 0.1, 0.001, 0.999, 1e-8,
            False, False, nt)
    return lambda: f(*args)


def isa(run):
    mods, chosen = _isa_modules(run.log)
    out = []
    for dtype in run.dtypes:
        for t in run.threads_isa:
            for n in run.isa_sizes:
                run.progress.update(f"isa {dtype} n={n} t={t}")
                case = P.Dense([n], dtype, t)
                arrays = (case.p[0], case.g[0], case.m[0], case.v[0])
                cases = {f"isa:{k}": _kernel_call(m, dtype, arrays, t) for k, m in mods.items()}
                with P.threads(t):
                    res = interleave(cases, repeats=run.repeats_for(n), target_s=run.target_s)
                base = res.get("isa:baseline", {}).get("median")
                for impl, rr in res.items():
                    r = _rec("isa", impl, rr, dtype=dtype, threads=t,
                             chosen=impl == f"isa:{chosen}")
                    if base:
                        r["vs_baseline"] = base / rr["median"]
                    out.append(_dense_fields(r, n, dtype, t, run))
                case.free()
                gc.collect()
    return out


def isa_steps(run):
    return len(run.dtypes) * len(run.threads_isa) * len(run.isa_sizes)


# --------------------------------------------------------------------------
# serial vs 2-thread crossover (sets fastadam._threads.SERIAL_THRESHOLD)
# --------------------------------------------------------------------------

def threshold(run):
    from fastadam import _dispatch
    mod = _dispatch.kernels
    out = []
    tmax = max(2, max(run.threads))
    for dtype in run.dtypes:
        run.progress.update(f"threshold {dtype}")
        case = P.Dense([max(run.threshold_sizes)], dtype, 1)
        rows = []
        for n in run.threshold_sizes:
            arrays = tuple(x[0][:n] for x in (case.p, case.g, case.m, case.v))
            cases = {"1 thread": _kernel_call(mod, dtype, arrays, 1),
                     f"{2} threads": _kernel_call(mod, dtype, arrays, 2)}
            with P.threads(tmax):
                res = interleave(cases, repeats=run.repeats, target_s=run.target_s)
            t1, t2 = res["1 thread"]["median"], res["2 threads"]["median"]
            bad = any(_disturbed(rr) for rr in res.values())
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
        for i, (n, t1, t2, _) in enumerate(clean):
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


def _disturbed(rr):
    return (rr.get("spread") or 1.0) > 1.5 or (rr.get("others_cpu") or 0.0) > 0.25


def _current_threshold():
    try:
        from fastadam import _threads
        return _threads.SERIAL_THRESHOLD
    except Exception:
        return None


# --------------------------------------------------------------------------

SCENARIOS = {
    "dense": (dense, dense_steps, "one array, 2**4..2**26 elements, per dtype and thread count"),
    "overhead": (overhead, lambda run: len(run.dtypes), "per-call cost at 16 elements"),
    "many": (many, lambda run: len(run.models) * len(run.dtypes_many) * len(run.threads_many),
             "model parameter shapes (GPT-2 small 148 arrays/124M, BERT-base 199/110M)"),
    "sparse": (sparse, lambda run: len(run.sparse_configs) * len(run.dtypes_sparse)
               * len(run.threads), "embedding rows x dim x batch x Zipf exponent"),
    "isa": (isa, isa_steps, "baseline vs avx2 vs avx512 kernel modules"),
    "threshold": (threshold, lambda run: len(run.dtypes),
                  "serial vs 2-thread crossover of the dense kernel"),
}
