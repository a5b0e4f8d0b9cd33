"""Design: output -- speedups, bounds, terminal tables, Markdown, JSON, plots.

What: ``finalize`` gives every bandwidth-bound record its fraction of the
run's ONE bound (per thread count; ``bound``) and every record its speedups
over the peers of its group; ``tables`` turns records into tables (the same
for the terminal and results.md); ``plots`` draws them with matplotlib.

Method: nothing here measures. A fraction above 100% of the bound is never
printed (``in cache`` or ``disturbed`` instead) and a speedup computed from a
disturbed time is printed as ``disturbed``; noisy times and speedups from
them carry a leading ``~`` (see ``bound``).
"""
import json
import math
import os
from typing import Any

from . import bound as B
from . import peers as P
from . import precision as PR
from .machine import bound_for
from .q8 import q8_tables

# scenario -> the record fields that, with it, name a group of comparable records
GROUP_KEYS: dict[str, tuple[str, ...]] = {
    "dense": ("variant", "dtype", "threads", "n"),
    "overhead": ("dtype", "threads"),
    "many": ("model", "dtype", "threads"),
    "torch": ("model", "dtype", "threads"),
    "sparse": ("rows", "dim", "batch", "zipf", "dtype", "threads", "mode"),
    "torch-sparse": ("workload", "dtype", "threads"),
    "q8": ("case", "dtype", "threads"),
    "train": ("model", "dtype", "threads"),
}


# the sparse batch modes' torch peer (the "vs" column)
SPARSE_TORCH = {"fixed": "torch", "cycling": "torch-cycling", "busy": "torch-cycling",
                "dense": "torch-fused-dense"}


def _is_ours(rec):
    return rec["impl"].startswith("fastadam")


def apply_bound(records, bw, llc):
    """Every record with a byte rate (``gbs``) gets the run's one bound for its
    thread count, ``bound_status`` and, when ``ok``, ``pct_bound`` (see
    :func:`bound.verdict`). Called again at the end of the run, so every
    table, results.md and the plots use the final figure."""
    for r in records:
        if "gbs" not in r:
            continue
        b = bound_for(bw, r.get("threads")) if bw else None
        status, pct = B.verdict(r["gbs"], b, r.get("working_set"), llc)
        r["bound_status"] = status
        for k in ("pct_bound", "bound_gbs", "bound_ns_per_elem", "pct_bound_raw"):
            r.pop(k, None)
        if b:
            r["bound_gbs"] = b
            if "bytes_per_elem" in r:
                r["bound_ns_per_elem"] = r["bytes_per_elem"] / b
            if "touched_bytes" in r:
                r["bound_ms"] = r["touched_bytes"] / b / 1e6
        if status == B.OK:
            r["pct_bound"] = pct
        elif pct is not None:
            r["pct_bound_raw"] = pct  # kept in the JSON, never printed
    return records


def finalize(records, bw, llc):
    """:func:`apply_bound` then :func:`add_speedups`."""
    apply_bound(records, bw, llc)
    return add_speedups(records)


def _bound_disturbed(d):
    """The bound is still the start-of-run figure and that probe was disturbed."""
    return bool(d.get("disturbed")) and d["bound_gbs"] <= d.get("start_gbs", d["bound_gbs"])


def bound_line(bw):
    """The one statement of the run's bound and how it was measured."""
    if not bw:
        return "bandwidth bound: not measured"
    by = bw["by_threads"]
    k = max(d.get("measurements", 1) for d in by.values())
    figs = ", ".join(f"{by[t]['bound_gbs']:.1f} GB/s with {t} thread{'s' if int(t) > 1 else ''}"
                     + (" (probe disturbed)" if _bound_disturbed(by[t]) else "")
                     for t in sorted(by, key=int))
    return (f"bandwidth bound: {figs}; "
            + B.METHOD.format(mib=bw["bytes_per_array"] / 2**20, k=k))


def add_speedups(records):
    """``vs_best_peer`` (best peer's median / this median) and ``best_peer`` on
    every record of a scenario with peers; the numpy reference is never a peer."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        keys = GROUP_KEYS.get(r["scenario"])
        if keys:
            groups.setdefault((r["scenario"],) + tuple(r.get(k) for k in keys), []).append(r)
    for rs in groups.values():
        peers = [r for r in rs if not _is_ours(r) and r["impl"] not in P.NOT_PEERS]
        if not peers:
            continue
        best = min(peers, key=lambda r: r["median_s"])
        for r in rs:
            for k in ("vs_best_peer", "vs", "vs_disturbed"):
                r.pop(k, None)
            r["best_peer"] = best["impl"]
            sp = B.speedup(r, best)
            if sp is None:
                r["vs_best_peer_status"] = B.DISTURBED
            else:
                r["vs_best_peer"] = sp
                r.pop("vs_best_peer_status", None)
            for q in peers:
                sq = B.speedup(r, q)
                if sq is None:
                    r.setdefault("vs_disturbed", []).append(q["impl"])
                else:
                    r.setdefault("vs", {})[q["impl"]] = sq
    return records


def _group_of(rec, recs):
    keys = GROUP_KEYS.get(rec["scenario"], ())
    return {r["impl"]: r for r in recs if r["scenario"] == rec["scenario"]
            and all(r.get(k) == rec.get(k) for k in keys)}


def fmt_best(r, recs, digits=2, name=True):
    """The "vs best peer" cell: ``2.31x (torch-fused)``, ``~`` when noisy,
    ``disturbed`` when either time is impossible."""
    if "best_peer" not in r:
        return "-"
    peer = _group_of(r, recs).get(r["best_peer"])
    txt = B.fmt_speedup(r, peer, digits)
    return f"{txt} ({r['best_peer']})" if name and txt not in ("-", B.DISTURBED) else txt


def fmt_vs(r, recs, peer_name, digits=2):
    return B.fmt_speedup(r, _group_of(r, recs).get(peer_name), digits)


NOISY, BUSY = B.NOISY, B.BUSY
disturbed = B.noisy  # a noisy time: printed with "~"


def fmt_r(r):
    """A record's median time, marked "~" when it was disturbed (see ``disturbed``)."""
    t = fmt_t(r["median_s"])
    return ("~" + t) if disturbed(r) else t


def fmt_t(s):
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    if s < 1e-6:
        return f"{s * 1e9:.0f} ns"
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_n(n):
    if n and n & (n - 1) == 0:
        return f"2^{int(math.log2(n))}"
    return f"{n:,}"


def _table(headers, rows):
    return {"headers": headers, "rows": [[str(c) for c in r] for r in rows]}


def _order(impls, preferred):
    return [i for i in preferred if i in impls] + sorted(i for i in impls if i not in preferred)


IMPL_ORDER = ("fastadam", "fastadam-plan", "fastadam.Adam", "fastadam.torch",
              "fastadam-premerged", "fastadam-cycling", "fastadam.SparseAdam", "torch-fused",
              "torch-foreach", "torch", "deepspeed", "numpy-ref")


def headline(recs):
    """One table of the key cases: float32, the most threads measured."""
    f32 = [r for r in recs if r.get("dtype") == "float32"]
    if not f32:
        return None
    cols = ["torch-fused", "torch-foreach", "torch", "deepspeed"]
    rows = []

    def add(label, rs, ours="fastadam"):
        by = {r["impl"]: r for r in rs}
        f = by.get(ours)
        if not f:
            return
        best = fmt_best(f, recs)
        rows.append([label, fmt_r(f)]
                    + [fmt_r(by[c]) if c in by else "-" for c in cols]
                    + [f"**{best}**" if best[:1].isdigit() else best, B.fmt_pct(f)])

    for r0 in [r for r in f32 if r["scenario"] == "overhead" and r["impl"] == "fastadam"]:
        add("16 elements (one call)", [r for r in f32 if r["scenario"] == "overhead"
                                       and r["threads"] == r0["threads"]])
    dense = [r for r in f32 if r["scenario"] == "dense" and r["variant"] == "adam"]
    if dense:
        t = max(r["threads"] for r in dense)
        for n in (2**16, 2**20, 2**24, 2**26):
            rs = [r for r in dense if r["n"] == n and r["threads"] == t]
            add(f"2^{int(math.log2(n))} elements, {t} threads", rs)
    for scen, ours, what in (("many", "fastadam.Adam", "fastadam.Adam"),
                             ("torch", "fastadam.torch", "fastadam.torch.AdamW")):
        many = [r for r in f32 if r["scenario"] == scen]
        if many:
            t = max(r["threads"] for r in many)
            for model in sorted({r["model"] for r in many}, key=lambda m: m != "gpt2-small"):
                rs = [r for r in many if r["model"] == model and r["threads"] == t]
                add(f"{model} ({rs[0]['arrays']} arrays), {what}, {t} threads", rs, ours=ours)
    sp = [r for r in f32 if r["scenario"] == "sparse"]
    if sp:
        t = max(r["threads"] for r in sp)
        first = sp[0]
        key = (first["rows"], first["dim"], first["batch"], first["zipf"])
        rs = [r for r in sp if (r["rows"], r["dim"], r["batch"], r["zipf"]) == key
              and r["threads"] == t]
        by = {r["impl"]: r for r in rs}
        f = by.get("fastadam")
        tor = by.get("torch")
        label = f"sparse {key[0]:,}x{key[1]}, {key[2]} ids Zipf({key[3]}), {t} threads"
        vs = fmt_vs(f, recs, "torch", 1) if f and tor else "-"
        rows.append([label, fmt_r(f) if f else "-",
                     "-", "-", (fmt_r(tor) + " (SparseAdam)") if tor else "-", "-",
                     (f"**{vs}** (torch SparseAdam)" if vs[:1].isdigit() else vs),
                     B.fmt_pct(f) if f else "-"])
    if not rows:
        return None
    return _table(["case (float32)", "fastadam"] + cols
                  + ["fastadam vs best peer", "fastadam % of bandwidth bound"], rows)


def _thr(t):
    return f"{t} thread{'s' if t > 1 else ''}"


def _bars(recs, rs, unit_ms=True):
    """Rows impl | ms/step | min-max | ns/elem | % of bound | vs torch-fused | vs best peer."""
    out = []
    for r in sorted(rs, key=lambda r: r["median_s"]):
        out.append([r["impl"], ("~" if disturbed(r) else "") + f"{r['median_s'] * 1e3:.3g}",
                    f"{r['min_s'] * 1e3:.3g}-{r['max_s'] * 1e3:.3g}",
                    f"{r['ns_per_elem']:.3f}", B.fmt_pct(r),
                    fmt_vs(r, recs, "torch-fused") if not r["impl"] == "torch-fused" else "1x",
                    fmt_best(r, recs, name=False)])
    return out


def tables(result):
    """All tables as (title, {"headers", "rows"}) in display order."""
    recs = result["results"]
    out = []
    h = headline(recs)
    if h and len(h["rows"]) > 1:
        out.append(("Headline: time per step (median); speedup = best peer / fastadam", h))
    bw = result.get("bandwidth")
    if bw:
        rows = []
        probes = []
        for t, d in sorted(bw["by_threads"].items(), key=lambda kv: int(kv[0])):
            probes = [k for k, v in d.items() if isinstance(v, dict)]
            rows.append([t] + [f"{d[k]['median_gbs']:.1f} ({d[k]['min_gbs']:.1f}-"
                               f"{d[k]['max_gbs']:.1f})" for k in probes]
                        + [d.get("measurements", 1),
                           f"**{d['bound_gbs']:.1f}**" + (" (disturbed)" if _bound_disturbed(d)
                                                          else ""),
                           f"{28 / d['bound_gbs']:.3f}", f"{56 / d['bound_gbs']:.3f}"])
        method = B.METHOD.format(mib=bw["bytes_per_array"] / 2**20, k="k")
        out.append((f"Memory bandwidth, GB/s: start-of-run probes (median (min-max)) and the "
                    f"run's one bound ({method})",
                    _table(["threads"] + [f"{p} at start" for p in probes]
                           + ["probe measurements (k)", "bound", "bound ns/elem fp32 (28 B)",
                              "fp64 (56 B)"], rows)))
    # dense
    dense = [r for r in recs if r["scenario"] == "dense"]
    key: tuple[Any, ...]  # a group's key: its length differs per scenario
    for key in sorted({(r["variant"], r["dtype"], r["threads"]) for r in dense}):
        rs = [r for r in dense if (r["variant"], r["dtype"], r["threads"]) == key]
        impls = _order({r["impl"] for r in rs}, IMPL_ORDER)
        sizes = sorted({r["n"] for r in rs})
        rows = []
        for n in sizes:
            by = {r["impl"]: r for r in rs if r["n"] == n}
            f = by.get("fastadam")
            row = [fmt_n(n)] + [fmt_r(by[i]) if i in by else "-" for i in impls]
            if f:
                row += [f"{f['ns_per_elem']:.3g}", B.fmt_pct(f), fmt_best(f, recs)]
            rows.append(row)
        out.append((f"Dense {key[0]}, {key[1]}, {_thr(key[2])}: time per step (median)",
                    _table(["elements"] + impls + ["fastadam ns/elem", "fastadam % of bound",
                                                   "fastadam vs best peer"], rows)))
    # overhead
    ov = [r for r in recs if r["scenario"] == "overhead"]
    for dt in sorted({r["dtype"] for r in ov}):
        rs = sorted([r for r in ov if r["dtype"] == dt], key=lambda r: r["median_s"])
        rows = [[r["impl"], ("~" if disturbed(r) else "") + f"{r['median_s'] * 1e6:.2f}",
                 f"{r['min_s'] * 1e6:.2f}-{r['max_s'] * 1e6:.2f}",
                 fmt_best(r, recs, name=False)] for r in rs]
        out.append((f"Per-call overhead, 16 elements, {dt}",
                    _table(["impl", "us/call", "min-max", "vs best peer"], rows)))
    # many arrays (numpy API) and torch level (opt.step())
    for scen, what in (("many", "Many arrays"),
                       ("torch", "Torch level, opt.step() of AdamW (torch.optim.AdamW vs "
                                 "the fastadam.torch drop-in)")):
        many = [r for r in recs if r["scenario"] == scen]
        for key in sorted({(r["model"], r["dtype"], r["threads"]) for r in many}):
            rs = [r for r in many if (r["model"], r["dtype"], r["threads"]) == key]
            r0 = rs[0]
            out.append((f"{what}: {key[0]} ({r0['arrays']} arrays, {r0['n'] / 1e6:.3g}M "
                        f"params), {key[1]}, {_thr(key[2])}",
                        _table(["impl", "ms/step", "min-max", "ns/elem", "% of bound",
                                "speedup of this vs torch-fused", "vs best peer"],
                               _bars(recs, rs))))
    # whole training steps and step-in-backward memory (fastadam.bench.train)
    tr = [r for r in recs if r["scenario"] == "train"]
    for key in sorted({(r["model"], r["dtype"], r["threads"]) for r in tr}):
        rs = [r for r in tr if (r["model"], r["dtype"], r["threads"]) == key]
        fused = {r["impl"]: r for r in rs}.get("torch-fused")
        rows = [[r["impl"], ("~" if disturbed(r) else "") + f"{r['median_s'] * 1e3:.3f}",
                 f"{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}",
                 f"{fused['median_s'] / r['median_s']:.2f}x" if fused else "-",
                 f"{r['faults_per_step']:.0f}" if "faults_per_step" in r else "-"]
                for r in rs]
        out.append((f"Training step (forward + backward + AdamW): {key[0]} "
                    f"({rs[0]['arrays']} tensors, {rs[0]['n'] / 1e6:.3g}M params), {key[1]}, "
                    f"{_thr(key[2])}",
                    _table(["impl", "ms/step", "min-max", "speedup vs torch-fused",
                            "page faults/step"], rows)))
    mem = [r for r in recs if r["scenario"] == "backward-memory"]
    if mem:
        rows = [[r["impl"], f"{r['extra_peak_mib']:.1f}", f"{r['grad_mib']:.1f}",
                 f"{r['saved_mib']:.1f} ({r['saved_vs_grads']:.2f}x the gradients)"
                 if "saved_mib" in r else "-"] for r in mem]
        out.append((f"Peak memory of a training step above parameters + state (VmHWM, one "
                    f"process per loop): {mem[0]['model']}",
                    _table(["loop", "extra peak MiB", "gradients MiB", "saved"], rows)))
    # sparse
    sp = [r for r in recs if r["scenario"] == "sparse"]
    for key in sorted({tuple(r.get(k) for k in GROUP_KEYS["sparse"]) for r in sp},
                      key=lambda k: tuple(str(x) for x in k)):
        rs = [r for r in sp if tuple(r.get(k) for k in GROUP_KEYS["sparse"]) == key]
        rs = sorted(rs, key=lambda r: r["median_s"])
        tname = SPARSE_TORCH.get(key[6] or "fixed", "torch")
        rows = [[r["impl"], ("~" if disturbed(r) else "") + f"{r['ms_per_step']:.3f}",
                 f"{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}",
                 f"{r['ns_per_touched_elem']:.2f}", B.fmt_pct(r),
                 fmt_vs(r, recs, tname, 1) if r["impl"] != tname else "1x",
                 f"{r['vs_1_thread']:.2f}x" if "vs_1_thread" in r else "-",
                 f"{100 * r['merge_share']:.0f}%" if "merge_share" in r else ""] for r in rs]
        r0 = rs[0]
        mode = {None: "", "fixed": " [one batch repeated]", "cycling": " [batch stream]",
                "busy": " [batch stream, one core kept busy by another process]",
                "dense": " [dense-equivalent mode, batch stream]"}.get(key[6], f" [{key[6]}]")
        out.append((f"Sparse{mode}: {key[0]:,} rows x {key[1]} dim, batch {key[2]} ids "
                    f"Zipf({key[3]}) -> {r0['unique_rows']:,} unique rows, {key[4]}, "
                    f"{_thr(key[5])} "
                    f"(bound = touched rows' bytes {r0['touched_bytes'] / 1e6:.1f} MB at the "
                    "bandwidth bound" + (f" = {r0['bound_ms']:.3f} ms)" if "bound_ms" in r0
                                         else ")"),
                    _table(["impl", "ms/step", "min-max", "ns/touched elem", "% of bound",
                            f"vs {tname}", "vs 1 thread", "merge share"], rows)))
    # sparse at scale
    sc = [r for r in recs if r["scenario"] == "sparse-scale"]
    if sc:
        rows = [[r["config"], f"{r['rows']:,} x {r['dim']}", r["where"],
                 f"{r['table_bytes'] / 1e9:.1f} GB", r["threads"], f"{r['ms_per_step']:.2f}",
                 f"{r['touched_rows_per_s'] / 1e6:.2f}M",
                 f"{r['rss_growth_bytes'] / 2**20:.0f} MiB",
                 f"{r['tracemalloc_peak_bytes'] / 2**20:.1f} MiB"] for r in sc]
        out.append((f"Sparse at scale: {sc[0]['batch']} Zipf({sc[0]['zipf']}) ids per step, a "
                    "stream of batches (RSS growth over the timed steps: the touched rows' "
                    "pages; tracemalloc: Python-side allocations per step)",
                    _table(["config", "table", "where", "table + state", "threads", "ms/step",
                            "touched rows/s", "RSS growth", "tracemalloc peak"], rows)))
    # torch-level sparse
    ts = [r for r in recs if r["scenario"] == "torch-sparse"]
    for key in sorted({tuple(r[k] for k in GROUP_KEYS["torch-sparse"]) for r in ts}):
        rs = sorted([r for r in ts if tuple(r[k] for k in GROUP_KEYS["torch-sparse"]) == key],
                    key=lambda r: r["median_s"])
        r0 = rs[0]
        rows = [[r["impl"], ("~" if disturbed(r) else "") + f"{r['ms_per_step']:.3f}",
                 f"{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}", B.fmt_pct(r),
                 fmt_vs(r, recs, "torch") if r["impl"] != "torch" else "1x"] for r in rs]
        if key[0] == "mixed":
            title = (f"Torch level, mixed model: EmbeddingBag {r0['rows']:,}x{r0['dim']} "
                     f"(sparse grads, {r0['batch']} ids -> {r0['unique_rows']:,} rows) + MLP "
                     f"({r0['dense_params'] / 1e6:.2f}M dense params), {_thr(key[2])}; torch = "
                     "Adam(fused) + SparseAdam, fastadam.torch = one Adam")
        else:
            title = (f"Torch level, skip-gram SparseAdam: table {r0['rows']:,}x{r0['dim']}, "
                     f"{r0['batch']} ids/step Zipf({r0['zipf']}) -> {r0['unique_rows']:,} "
                     f"rows, {_thr(key[2])}")
        out.append((title, _table(["impl", "ms/step", "min-max", "% of bound",
                                   "speedup vs torch"], rows)))
    # isa
    isa = [r for r in recs if r["scenario"] == "isa"]
    if isa:
        impls = _order({r["impl"] for r in isa}, ("isa:baseline", "isa:avx2", "isa:avx512"))
        rows = []
        for key in sorted({(r["dtype"], r["threads"], r["n"]) for r in isa}):
            by = {r["impl"]: r for r in isa if (r["dtype"], r["threads"], r["n"]) == key}
            rows.append([key[0], key[1], fmt_n(key[2])]
                        + [f"{fmt_r(by[i])} ({by[i]['ns_per_elem']:.3g} ns/el"
                           + (f", {by[i]['vs_baseline']:.2f}x" if "vs_baseline" in by[i] else "")
                           + ")" if i in by else "-" for i in impls])
        chosen = next((r["impl"] for r in isa if r.get("chosen")), "?")
        out.append((f"ISA modules (fastadam.adam_step, one process per module with FASTADAM_ISA; "
                    f"chosen at import: {chosen}); "
                    "time (ns/elem, speedup vs baseline)",
                    _table(["dtype", "threads", "elements"] + impls, rows)))
    # threshold
    th = [r for r in recs if r["scenario"] == "threshold"]
    summ = [r for r in recs if r["scenario"] == "threshold-summary"]
    for s in summ:
        rs = [r for r in th if r["dtype"] == s["dtype"]]
        rows = []
        for n in sorted({r["n"] for r in rs}):
            by = {r["threads"]: r for r in rs if r["n"] == n}
            rows.append([f"{n:,}", fmt_r(by[1]), fmt_r(by[2]),
                         f"{by[2]['ratio_2_over_1']:.2f}",
                         "2 threads" if by[2]["median_s"] < by[1]["median_s"] else "1 thread"])
        cross = s["crossover_elems"]
        dis = s.get("disturbed_sizes") or []
        out.append((f"Serial vs 2-thread crossover, {s['dtype']} ({s['isa']}): 2 threads win "
                    f"from {cross:,} elements -> SERIAL_THRESHOLD (per thread) = "
                    f"{s['suggested_serial_threshold']:,} (now {s['current_serial_threshold']})"
                    + (f"; {len(dis)} disturbed sizes ignored" if dis else "")
                    + ("" if s.get("reliable", True) else
                       " -- UNRELIABLE: no undisturbed smaller size where 1 thread won; re-run "
                       "on a quieter machine")
                    if cross else
                    f"Serial vs 2-thread crossover, {s['dtype']}: no stable crossover in range",
                    _table(["elements", "1 thread", "2 threads", "t2/t1", "faster"], rows)))
    out += PR.tables(recs)
    out += q8_tables(recs, fmt_r, _table, B.fmt_pct)
    # soak
    for sm in [r for r in recs if r["scenario"] == "soak-summary"]:
        rows = []
        for r in recs:
            if r["scenario"] == "soak" and r["phase"] == sm["phase"]:
                rows.append([f"{r['steps']:,}", r["kind"],
                             "-" if r["rss_mib"] is None else f"{r['rss_mib']:.1f}",
                             f"{r['traced_mib'] * 1024:.1f}",
                             f"{r['traced_peak_mib']:.1f}",
                             "warm-up" if r["warmup"] else ""])
        g = sm["rss_growth_mib"]
        out.append((f"Soak, {sm['phase']} arrays ({sm['n']:,} elements): {sm['steps']:,} steps, "
                    f"{sm['optimizers']} optimizers; after warm-up RSS "
                    f"{'n/a' if g is None else f'{g:+.2f} MiB'} (tolerance "
                    f"{sm['rss_tol_mib']} MiB), traced {sm['traced_growth_kib']:+.1f} KiB "
                    f"(tolerance {sm['traced_tol_kib']} KiB): "
                    + ("**FAILED**" if sm["failed"] else "flat"),
                    _table(["steps", "last optimizer", "RSS MiB", "traced KiB",
                            "traced peak MiB", ""], rows)))
    return out


def render_terminal(title, t):
    hdr, rows = t["headers"], t["rows"]
    w = [max(len(h.replace("**", "")), *(len(r[i].replace("**", "")) for r in rows))
         if rows else len(h) for i, h in enumerate(hdr)]
    lines = [title, "  ".join(h.ljust(w[i]) for i, h in enumerate(hdr)),
             "  ".join("-" * x for x in w)]
    for r in rows:
        lines.append("  ".join(c.replace("**", "").ljust(w[i]) for i, c in enumerate(r)))
    return "\n".join(lines)


def render_markdown(title, t):
    hdr, rows = t["headers"], t["rows"]
    lines = [f"**{title}**", "", "| " + " | ".join(hdr) + " |",
             "|" + "|".join(" --- " for _ in hdr) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def markdown(result):
    m = result["meta"]
    cfg = m["machine"].get("fastadam_config", {})
    v = m["machine"]["versions"]
    head = [
        f"Machine: {m['machine']['cpu']}, {m['machine']['usable_cpus']} cores, "
        f"{m['machine']['mem_total_gb']} GB RAM, caches {m['machine']['caches']}; "
        f"fastadam {v.get('fastadam')} ISA module `{cfg.get('isa')}`, OpenMP "
        f"{'on' if cfg.get('openmp') else 'off'}; numpy {v.get('numpy')}, torch "
        f"{v.get('torch')}, deepspeed {v.get('deepspeed')}, python {v.get('python')}; "
        f"fastadam source: {m['machine'].get('fastadam_source', {}).get('commit', '?')}.",
        f"Run: `{m['command']}` ({m['mode']} mode), {m['date_utc']}, took "
        f"{m['duration_s']:.0f} s; load average before/after "
        f"{m.get('loadavg_start')} / {m.get('loadavg_end')}; other processes used "
        f"{m.get('others_cpu', float('nan')):.2f} CPUs on average during the run.",
        "Times are medians over interleaved repeats (min-max in results.json); "
        "\"vs best peer\" = best peer's median / fastadam's median (the numpy reference "
        "is not a peer); % of bound = achieved bytes/s (28 B/elem fp32, 56 fp64) over the "
        "run's one bandwidth bound (" + bound_line(result.get("bandwidth")) + "). A time "
        f"marked ~ was noisy even after re-measuring: its repeats spread more than {NOISY}x "
        f"(max/min) or other processes used more than {BUSY} CPUs meanwhile; so is a "
        "speedup computed from it. \"in cache\": the case fits in the last-level cache and "
        "beat the memory bound (which does not apply to it). \"disturbed\": a case larger "
        "than the cache read above the bound even after re-measuring -- impossible, so "
        "neither its fraction nor its speedups are given.",
    ]
    if result.get("skipped"):
        head.append("Skipped: " + "; ".join(result["skipped"]))
    parts = ["\n".join(head)] + [render_markdown(t, tb) for t, tb in tables(result)]
    return "\n\n".join(parts) + "\n"


def write_json(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=str)


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------

def plots(result, outdir, log=print):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"plots skipped: matplotlib is not installed ({P.INSTALL['matplotlib']})")
        return []
    files = []
    recs = result["results"]
    dense = [r for r in recs if r["scenario"] == "dense"]
    style: dict[str, dict[str, Any]] = {
        "fastadam": dict(color="C3", lw=2.4, marker="o"),
        "fastadam.torch": dict(color="C1", marker="."),
        "torch-fused": dict(color="C0", marker="s"),
        "torch-foreach": dict(color="C9", marker="^"),
        "torch": dict(color="C2", marker="v"),
        "deepspeed": dict(color="C4", marker="D"),
        "numpy-ref": dict(color="0.5", marker="x", ls=":")}
    key: tuple[Any, ...]  # a group's key: its length differs per scenario
    for key in sorted({(r["variant"], r["dtype"], r["threads"]) for r in dense}):
        rs = [r for r in dense if (r["variant"], r["dtype"], r["threads"]) == key]
        if len({r["n"] for r in rs}) < 2:
            continue
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for impl in _order({r["impl"] for r in rs}, IMPL_ORDER):
            pts = sorted((r["n"], r["ns_per_elem"]) for r in rs if r["impl"] == impl)
            a1.plot(*zip(*pts), label=impl, **style.get(impl, {}))
        bnd = next((r for r in rs if "bound_ns_per_elem" in r), None)
        if bnd:
            a1.axhline(bnd["bound_ns_per_elem"], color="k", ls="--", lw=1,
                       label=f"bandwidth bound ({bnd['bound_gbs']:.1f} GB/s)")
        a1.set_xscale("log", base=2)
        a1.set_yscale("log")
        a1.set_xlabel("elements")
        a1.set_ylabel("ns per element (median)")
        a1.set_title(f"{key[0]} {key[1]}, {key[2]} thread(s): time per element")
        a1.grid(True, which="both", alpha=0.3)
        a1.legend(fontsize=7)
        fa = {r["n"]: r for r in rs if r["impl"] == "fastadam"}
        for impl in _order({r["impl"] for r in rs}, IMPL_ORDER):
            if impl in P.OURS or impl in P.NOT_PEERS:
                continue
            pts = sorted((r["n"], B.speedup(fa[r["n"]], r)) for r in rs
                         if r["impl"] == impl and r["n"] in fa
                         and B.speedup(fa[r["n"]], r) is not None)  # never a disturbed one
            if pts:
                a2.plot(*zip(*pts), label=f"vs {impl}", **style.get(impl, {}))
        a2.axhline(1.0, color="k", lw=1)
        a2.set_xscale("log", base=2)
        a2.set_yscale("log")
        a2.set_xlabel("elements")
        a2.set_ylabel("fastadam speedup (peer time / fastadam time)")
        a2.set_title("fastadam speedup vs peers")
        a2.grid(True, which="both", alpha=0.3)
        a2.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(outdir, f"dense_{key[0]}_{key[1]}_t{key[2]}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    # many arrays and sparse: bars of time per step
    for scen, keys, unit, scale in (("many", GROUP_KEYS["many"], "ms/step", 1e3),
                                    ("torch", GROUP_KEYS["torch"], "ms/step", 1e3),
                                    ("sparse", GROUP_KEYS["sparse"], "ms/step", 1e3),
                                    ("torch-sparse", GROUP_KEYS["torch-sparse"], "ms/step", 1e3)):
        rs_all = [r for r in recs if r["scenario"] == scen]
        for key in sorted({tuple(r[k] for k in keys) for r in rs_all}):
            rs = sorted([r for r in rs_all if tuple(r[k] for k in keys) == key],
                        key=lambda r: r["median_s"])
            fig, ax = plt.subplots(figsize=(7, 0.45 * len(rs) + 1.2))
            names = [r["impl"] for r in rs][::-1]
            vals = [r["median_s"] * scale for r in rs][::-1]
            errs = [[(r["median_s"] - r["min_s"]) * scale for r in rs][::-1],
                    [(r["max_s"] - r["median_s"]) * scale for r in rs][::-1]]
            cols = ["C3" if _is_ours(r) else "C0" for r in rs][::-1]
            ax.barh(names, vals, xerr=errs, color=cols, capsize=3)
            tops = [r["max_s"] * scale for r in rs][::-1]
            for y, (val, top) in enumerate(zip(vals, tops)):
                ax.text(top, y, f"  {val:.3g}", va="center", fontsize=8)
            ax.set_xlabel(f"{unit} (median, min-max)")
            if scen == "sparse":
                ttl = (f"sparse {key[0]:,}x{key[1]}, batch {key[2]}, Zipf({key[3]}), "
                       f"{key[5]} thread(s)")
            else:
                ttl = (f"{'torch level: ' if scen.startswith('torch') else ''}{key[0]}, "
                       f"{key[1]}, {key[2]} thread(s)")
            ax.set_title(ttl, fontsize=10)
            ax.set_xlim(0, max(tops) * 1.22)
            fig.tight_layout()
            tag = "_".join(str(k) for k in key).replace(".", "p")
            path = os.path.join(outdir, f"{scen}_{tag}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            files.append(path)
    return files
