"""Design: the ``precision`` scenario -- fewer bytes per element (issue 12).

What: one step of every dtype combination fastadam compiles for low
precision -- float32 params and grads with bfloat16 moments, float32 params
with bfloat16 grads (with float32 or bfloat16 moments), all-bfloat16 (round
to nearest and stochastic), all-float16, and the float32 master with
bfloat16 grads and a bfloat16 ``param_copy`` written in the same pass --
side by side with ``torch.optim.Adam(fused=True)`` in float32 and in the
same 16-bit dtype, torch's float32 step with the casts a ZeRO-Offload loop
does around it (bfloat16 grads up, bfloat16 copy of the params down), and
DeepSpeedCPUAdam where installed (a skip line otherwise: float32, all-bf16,
all-fp16 natively, and float32 with the same casts). Workloads: single
arrays (``--sizes``, default 2**16, 2**20, 2**26) and model shapes
(``--models``, GPT-2 small by default).

Method: the scenario's usual one: all implementations of a workload share
buffers of each dtype (a float32, a bfloat16 and a float16 set: ~2.1 GiB at
2**26), run in this process, interleaved (``timing.measure``), with the
bandwidth probes interleaved for large cases. Each record carries its bytes
per element per step (reads + writes of p, g, m, v and the copy), its GB/s,
% of the bandwidth bound (``report.apply_bound``), and the optimizer state
memory per parameter (``state_bytes_per_param``: m + v).
"""
import math
from typing import Any

import numpy as np

from . import peers as P

# label -> (param, grad, state, param_copy, stochastic rounding)
COMBOS = {
    "fp32": ("float32", "float32", "float32", None, False),
    "fp32 p/g + bf16 m/v": ("float32", "float32", "bfloat16", None, False),
    "fp32 p + bf16 g": ("float32", "bfloat16", "float32", None, False),
    "fp32 p + bf16 g/m/v": ("float32", "bfloat16", "bfloat16", None, False),
    "all-bf16": ("bfloat16", "bfloat16", "bfloat16", None, False),
    "all-bf16 SR": ("bfloat16", "bfloat16", "bfloat16", None, True),
    "all-fp16": ("float16", "float16", "float16", None, False),
    "fp32 master + bf16 g + bf16 copy": ("float32", "bfloat16", "float32", "bfloat16", False),
}
# torch peers: label -> (dtype, casts around a float32 step)
TORCH = {
    "torch-fused fp32": ("float32", False),
    "torch-fused bf16": ("bfloat16", False),
    "torch-fused fp16": ("float16", False),
    "torch-fused fp32 + casts": ("float32", True),
}
SIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


def bytes_per_elem(p, g, s, c=None):
    """Read p, g, m, v; write p, m, v (and the copy)."""
    return 2 * SIZE[p] + SIZE[g] + 4 * SIZE[s] + (SIZE[c] if c else 0)


def torch_bytes_per_elem(dt, casts):
    """torch fused moves 7 buffers of its dtype; with the casts also bf16 grads
    read and float32 grads written, float32 params read and a bf16 copy written."""
    return 7 * SIZE[dt] + ((2 + 4 + 4 + 2) if casts else 0)


class Pool:
    """One set of (params, grads, exp_avgs, exp_avg_sqs) per dtype for all shapes
    (filled from one float32 draw), a bfloat16 copy buffer per shape."""

    def __init__(self, shapes, seed=0):
        import ml_dtypes
        rng = np.random.default_rng(seed)
        self.np = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                   "float16": np.dtype(np.float16)}
        self.sets: dict[str, tuple[list[Any], ...]] = {k: ([], [], [], []) for k in self.np}
        self.copies: list[Any] = []
        for shp in shapes:
            p = rng.standard_normal(shp, dtype=np.float32)
            g = rng.standard_normal(shp, dtype=np.float32)
            for k, dt in self.np.items():
                ps, gs, ms, vs = self.sets[k]
                ps.append(p.astype(dt))
                gs.append(g.astype(dt))
                ms.append(np.zeros(shp, dt))
                vs.append(np.zeros(shp, dt))
            self.copies.append(np.zeros(shp, self.np["bfloat16"]))
            del p, g
        self.n = sum(int(np.prod(s)) for s in shapes)
        self._torch: dict[str, Any] = {}

    def arrays(self, p, g, s):
        return (self.sets[p][0], self.sets[g][1], self.sets[s][2], self.sets[s][3])

    def torch(self, dt):
        """Tensors over the ``dt`` set: params (grads set), exp_avgs, exp_avg_sqs."""
        if dt not in self._torch:
            torch = P.torch_mod()
            ps, gs, ms, vs = self.sets[dt]

            def view(a):
                t = torch.from_numpy(a.view(np.int16) if a.dtype.itemsize == 2 else a)
                return t.view({"bfloat16": torch.bfloat16, "float16": torch.float16}[dt]) \
                    if a.dtype.itemsize == 2 else t
            tps = [view(a) for a in ps]
            for tp, gx in zip(tps, gs):
                tp.grad = view(gx)
            self._torch[dt] = (tps, [view(a) for a in ms], [view(a) for a in vs])
        return self._torch[dt]


def _fastadam(pool, p, g, s, c, sr, nt):
    import fastadam as fa
    ps, gs, ms, vs = pool.arrays(p, g, s)
    kw = dict(lr=P.LR, n_threads=nt)
    if c:
        kw["param_copies"] = pool.copies
    if sr:
        kw.update(stochastic_rounding=True, seed=1)
    state = {"step": 0}

    def step():
        state["step"] += 1
        fa.functional.adam(ps, gs, ms, vs, steps=state["step"], **kw)
    return step


def _torch_fused(pool, dt, casts):
    torch = P.torch_mod()
    tps, tms, tvs = pool.torch(dt)
    opt = torch.optim.Adam(tps, lr=P.LR, fused=True)
    for tp, tm, tv in zip(tps, tms, tvs):
        opt.state[tp] = {"step": torch.zeros((), dtype=torch.float32), "exp_avg": tm,
                         "exp_avg_sq": tv}
    return _with_casts(pool, tps, opt.step) if casts else opt.step


def _with_casts(pool, tps, fp32_step):
    """``fp32_step`` inside the ZeRO-Offload loop's casts: the bf16 grads from the
    accelerator copied into the float32 params' grads, the bf16 copy sent back."""
    torch = P.torch_mod()
    g16 = pool.torch("bfloat16")[0]
    c16 = [torch.from_numpy(c.view(np.int16)).view(torch.bfloat16) for c in pool.copies]
    pairs = list(zip(tps, g16, c16))

    def step():
        for tp, tg, _ in pairs:
            tp.grad.copy_(tg.grad)
        fp32_step()
        for tp, _, tc in pairs:
            tc.copy_(tp)
    return step


# DeepSpeedCPUAdam peers: label -> (dtype set, casts around a float32 step). Its
# kernel takes (param, state) = (fp32, fp32), (bf16|fp16, fp32) and (bf16|fp16, same)
# with grads in the param dtype: so all-bf16 and all-fp16 natively, and the ZeRO-Offload
# loop as bf16 grads cast up, its float32 step, the bf16 copy cast down.
DEEPSPEED = {
    "deepspeed fp32": ("float32", False),
    "deepspeed all-bf16": ("bfloat16", False),
    "deepspeed all-fp16": ("float16", False),
    "deepspeed fp32 + casts": ("float32", True),
}


def _deepspeed(pool, dt, casts):
    """One DeepSpeedCPUAdam step over the ``dt`` set (its state tensors put in
    place); the cached optimizer is re-pointed at this peer's params per call,
    so several DeepSpeed peers interleave (their state keys are distinct
    tensors)."""
    tps, tms, tvs = pool.torch(dt)
    opt = P.deepspeed_opt(False, tps[0])
    for tp, tm, tv in zip(tps, tms, tvs):
        opt.state[tp] = {"step": 0, "exp_avg": tm, "exp_avg_sq": tv}
    group = opt.param_groups[0]
    plist = list(tps)

    def step():
        group["params"] = plist
        opt.step()
    return _with_casts(pool, tps, step) if casts else step


def precision(run):
    """The scenario: per workload and thread count, one interleaved set."""
    from . import scenarios as S
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:
        msg = "skip precision: needs ml_dtypes (pip install ml_dtypes)"
        if msg not in run.skipped:
            run.skipped.append(msg) if isinstance(run.skipped, list) else run.skipped.add(msg)
            run.log(msg)
        return []
    workloads = [(S_fmt(n), [(n,)]) for n in run.precision_sizes]
    workloads += [(m, S.MODELS[m]()) for m in run.precision_models]
    out = []
    peers = dict(TORCH)
    try:
        P.deepspeed_cls()       # raises Skip where it is not installed
        peers.update(DEEPSPEED)
    except P.Skip as e:
        msg = f"skip deepspeed (precision): {e}"
        if msg not in run.skipped:
            run.skipped.append(msg) if isinstance(run.skipped, list) else run.skipped.add(msg)
            run.log(msg)
    for name, shapes in workloads:
        pool = Pool(shapes)
        for t in run.threads:
            run.progress.update(f"precision {name} t={t}")
            with P.threads(t):
                cases, nbytes, meta = {}, {}, {}
                for label, (p, g, s, c, sr) in COMBOS.items():
                    impl = f"fastadam {label}"
                    fn = _fastadam(pool, p, g, s, c, sr, t)
                    fn()
                    cases[impl] = fn
                    nbytes[impl] = bytes_per_elem(p, g, s, c) * pool.n
                    meta[impl] = dict(combo=label, param=p, grad=g, state=s, copy=c, sr=sr,
                                      bytes_per_elem=bytes_per_elem(p, g, s, c),
                                      state_bytes_per_param=2 * SIZE[s])
                for label, (dt, casts) in peers.items():
                    try:
                        make = _deepspeed if label.startswith("deepspeed") else _torch_fused
                        fn = make(pool, dt, casts)
                        fn()
                    except P.Skip as e:
                        run.log(f"skip {label}: {e}")
                        continue
                    cases[label] = fn
                    bpe = torch_bytes_per_elem(dt, casts)
                    nbytes[label] = bpe * pool.n
                    meta[label] = dict(combo=label, param=dt, grad="bfloat16" if casts else dt,
                                       state=dt, copy="bfloat16" if casts else None, sr=False,
                                       bytes_per_elem=bpe, state_bytes_per_param=2 * SIZE[dt])
                ws = sum(a.nbytes for st in pool.sets.values() for lst in st for a in lst)
                res = S.measure_case(run, cases, t, nbytes, ws,
                                     repeats=max(3, run.repeats // 2 + 1), warmup=1,
                                     label=f"precision {name} t={t}",
                                     probe_bytes=max(nbytes.values()))
            for impl, rr in res.items():
                r = S._rec("precision", impl, rr, workload=name, threads=t, n=pool.n,
                           **meta[impl])
                r.update(ns_per_elem=rr["median"] / pool.n * 1e9,
                         gbs=meta[impl]["bytes_per_elem"] * pool.n / rr["median"] / 1e9,
                         working_set=meta[impl]["bytes_per_elem"] * pool.n)
                out.append(r)
            del cases
        del pool
        S._cleanup()
    return out


def S_fmt(n):
    return f"2^{int(math.log2(n))}" if n & (n - 1) == 0 else f"{n:,}"


def steps(run):
    return (len(run.precision_sizes) + len(run.precision_models)) * len(run.threads)


def tables(recs):
    """The scenario's tables: per workload and thread count, every impl with its
    time, bytes/element, GB/s, % of bound, state bytes per parameter and its
    speedup over torch fused float32, over torch fused in its own dtype and over
    DeepSpeedCPUAdam on the same (param, grad, state, copy) combination."""
    from . import report as RP
    from .bound import fmt_pct
    prec = [r for r in recs if r["scenario"] == "precision"]
    out = []
    for wl, t in sorted({(r["workload"], r["threads"]) for r in prec},
                        key=lambda k: (str(k[0]), k[1])):
        rs = [r for r in prec if r["workload"] == wl and r["threads"] == t]
        by = {r["impl"]: r for r in rs}
        f32 = by.get("torch-fused fp32")
        ds = {(r["param"], r["grad"], r["state"], r["copy"]): r for r in rs
              if r["impl"].startswith("deepspeed")}
        rows = []
        for r in rs:
            dsr = ds.get((r["param"], r["grad"], r["state"], r["copy"]))
            same = by.get(f"torch-fused {'bf16' if r['param'] == 'bfloat16' else 'fp16'}") \
                if r["param"] in ("bfloat16", "float16") else None
            if r["copy"] and not r["impl"].startswith("torch"):
                same = by.get("torch-fused fp32 + casts")
            rows.append([r["impl"], RP.fmt_r(r), r["bytes_per_elem"],
                         f"{r['gbs']:.1f}", fmt_pct(r), r["state_bytes_per_param"],
                         f"{f32['median_s'] / r['median_s']:.2f}x" if f32 else "-",
                         f"{same['median_s'] / r['median_s']:.2f}x"
                         if same and same is not r else "-",
                         f"{dsr['median_s'] / r['median_s']:.2f}x"
                         if dsr and dsr is not r and not r["impl"].startswith("torch") else "-"])
        out.append((f"Precision, {wl} ({rs[0]['n']:,} elements), {RP._thr(t)}: time per "
                    "step (median); speedups = torch's time / this one",
                    RP._table(["implementation", "time", "bytes/elem", "GB/s", "% of bound",
                               "state B/param", "vs torch-fused fp32",
                               "vs torch same dtype (copy: fp32 + casts)",
                               "vs DeepSpeed same combo"], rows)))
    return out
