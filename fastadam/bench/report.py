"""Output: speedups, terminal tables, Markdown, JSON, plots."""
import json
import math
import os

from . import peers as P
from .scenarios import SPARSE_OURS

GROUP_KEYS = {
    "dense": ("variant", "dtype", "threads", "n"),
    "overhead": ("dtype", "threads"),
    "many": ("model", "dtype", "threads"),
    "sparse": ("rows", "dim", "batch", "zipf", "dtype", "threads"),
}


def _is_ours(rec):
    ours = SPARSE_OURS if rec["scenario"] == "sparse" else P.OURS + ("fastadam-kernel",)
    return rec["impl"] in ours


def fill_bounds(records):
    """Cases too small to interleave probes (bound measured at the start of the
    run) get the median of the bounds the large cases measured interleaved,
    per thread count, when there are any: the start-of-run probe is one
    moment; the interleaved ones span the run."""
    import statistics
    by_t = {}
    for r in records:
        if r.get("bound_source") == "interleaved" and r["scenario"] in ("dense", "many"):
            by_t.setdefault(r["threads"], set()).add(r["bound_gbs"])
    for r in records:
        if r.get("bound_source") == "start of run" and by_t.get(r.get("threads")):
            b = statistics.median(sorted(by_t[r["threads"]]))
            r["bound_start_gbs"] = r["bound_gbs"]
            r.update(bound_gbs=b, bound_source="interleaved (run median)")
            if "bytes_per_elem" in r:
                r.update(pct_bound=100.0 * r["gbs"] / b, bound_ns_per_elem=r["bytes_per_elem"] / b)
    return records


def add_speedups(records):
    """``vs_best_peer`` (best peer's median / this median) and ``best_peer`` on
    every record of a scenario with peers; the numpy reference is never a peer."""
    groups = {}
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
            r["best_peer"] = best["impl"]
            r["vs_best_peer"] = best["median_s"] / r["median_s"]
            for q in peers:
                r.setdefault("vs", {})[q["impl"]] = q["median_s"] / r["median_s"]
    return records


NOISY = 1.5  # max/min over the repeats above which a cell is marked "~"


BUSY = 0.25  # CPUs used by other processes during a case above which it is marked "~"


def disturbed(r):
    return (r.get("spread") or 1.0) > NOISY or (r.get("others_cpu") or 0.0) > BUSY


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


IMPL_ORDER = ("fastadam", "fastadam-kernel", "fastadam.Adam", "fastadam.torch",
              "fastadam-premerged", "fastadam.SparseAdam", "torch-fused", "torch-foreach",
              "torch", "deepspeed", "numpy-ref")


def headline(recs):
    """One table of the key cases: float32, the most threads measured."""
    f32 = [r for r in recs if r.get("dtype") == "float32"]
    if not f32:
        return None
    cols = ["torch-fused", "torch-foreach", "torch", "deepspeed"]
    rows = []

    def add(label, rs, ours="fastadam", unit=fmt_t):
        by = {r["impl"]: r for r in rs}
        f = by.get(ours)
        if not f:
            return
        rows.append([label, fmt_r(f)]
                    + [fmt_r(by[c]) if c in by else "-" for c in cols]
                    + [f"**{f['vs_best_peer']:.2f}x** ({f['best_peer']})"
                       if "vs_best_peer" in f else "-",
                       f"{f['pct_bound']:.0f}%" if "pct_bound" in f else "-"])

    for r0 in [r for r in f32 if r["scenario"] == "overhead" and r["impl"] == "fastadam"]:
        add("16 elements (one call)", [r for r in f32 if r["scenario"] == "overhead"
                                       and r["threads"] == r0["threads"]])
    dense = [r for r in f32 if r["scenario"] == "dense" and r["variant"] == "adam"]
    if dense:
        t = max(r["threads"] for r in dense)
        for n in (2**16, 2**20, 2**24, 2**26):
            rs = [r for r in dense if r["n"] == n and r["threads"] == t]
            add(f"2^{int(math.log2(n))} elements, {t} threads", rs)
    many = [r for r in f32 if r["scenario"] == "many"]
    if many:
        t = max(r["threads"] for r in many)
        for model in sorted({r["model"] for r in many}, key=lambda m: m != "gpt2-small"):
            rs = [r for r in many if r["model"] == model and r["threads"] == t]
            rr = rs[0]
            add(f"{model} ({rr['arrays']} arrays), fastadam.Adam, {t} threads", rs,
                ours="fastadam.Adam")
    sp = [r for r in f32 if r["scenario"] == "sparse"]
    if sp:
        t = max(r["threads"] for r in sp)
        first = sp[0]
        key = (first["rows"], first["dim"], first["batch"], first["zipf"])
        rs = [r for r in sp if (r["rows"], r["dim"], r["batch"], r["zipf"]) == key
              and r["threads"] == t]
        by = {r["impl"]: r for r in rs}
        if "torch" in by:  # torch SparseAdam goes in the torch column
            rs = [dict(r, impl="torch-sparse") if r["impl"] == "torch" else r for r in rs]
        f = next((r for r in rs if r["impl"] == "fastadam"), None)
        tor = by.get("torch")
        label = f"sparse {key[0]:,}x{key[1]}, {key[2]} ids Zipf({key[3]}), {t} threads"
        rows.append([label, fmt_t(f["median_s"]) if f else "-",
                     "-", "-", (fmt_t(tor["median_s"]) + " (SparseAdam)") if tor else "-", "-",
                     f"**{f['vs_best_peer']:.1f}x** (torch SparseAdam)"
                     if f and "vs_best_peer" in f else "-",
                     f"{f['pct_bound']:.0f}%" if f and "pct_bound" in f else "-"])
    if not rows:
        return None
    return _table(["case (float32)", "fastadam"] + cols
                  + ["fastadam vs best peer", "fastadam % of bandwidth bound"], rows)


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
        for t, d in sorted(bw["by_threads"].items(), key=lambda kv: int(kv[0])):
            probes = [k for k, v in d.items() if isinstance(v, dict)]
            rows.append([t] + [f"{d[k]['median_gbs']:.1f} ({d[k]['min_gbs']:.1f}-"
                               f"{d[k]['max_gbs']:.1f})" for k in probes]
                        + [f"**{d['bound_gbs']:.1f}** ({d['bound_probe']})",
                           f"{28 / d['bound_gbs']:.3f}", f"{56 / d['bound_gbs']:.3f}"])
        out.append((f"Memory bandwidth, GB/s (median (min-max); float32 arrays of "
                    f"{bw['bytes_per_array'] / 2**20:.0f} MiB)",
                    _table(["threads"] + probes + ["bound", "bound ns/elem fp32 (28 B)",
                                                   "fp64 (56 B)"], rows)))
    # dense
    dense = [r for r in recs if r["scenario"] == "dense"]
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
                row += [f"{f['ns_per_elem']:.3g}", f"{f.get('pct_bound', float('nan')):.0f}%",
                        f"{f['vs_best_peer']:.2f}x ({f['best_peer']})" if "vs_best_peer" in f
                        else "-"]
            rows.append(row)
        out.append((f"Dense {key[0]}, {key[1]}, {key[2]} thread{'s' if key[2] > 1 else ''}: "
                    "time per step (median)",
                    _table(["elements"] + impls + ["fastadam ns/elem", "fastadam % of bound",
                                                   "fastadam vs best peer"], rows)))
    # overhead
    ov = [r for r in recs if r["scenario"] == "overhead"]
    for dt in sorted({r["dtype"] for r in ov}):
        rs = sorted([r for r in ov if r["dtype"] == dt], key=lambda r: r["median_s"])
        rows = [[r["impl"], ("~" if disturbed(r) else "")
                 + f"{r['median_s'] * 1e6:.2f}",
                 f"{r['min_s'] * 1e6:.2f}-{r['max_s'] * 1e6:.2f}",
                 f"{r['vs_best_peer']:.2f}x" if "vs_best_peer" in r else "-"] for r in rs]
        out.append((f"Per-call overhead, 16 elements, {dt}",
                    _table(["impl", "us/call", "min-max", "vs best peer"], rows)))
    # many
    many = [r for r in recs if r["scenario"] == "many"]
    for key in sorted({(r["model"], r["dtype"], r["threads"]) for r in many}):
        rs = [r for r in many if (r["model"], r["dtype"], r["threads"]) == key]
        rs = sorted(rs, key=lambda r: r["median_s"])
        rows = [[r["impl"], ("~" if disturbed(r) else "")
                 + f"{r['ms_per_step']:.1f}",
                 f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}", f"{r['ns_per_elem']:.3f}",
                 f"{r.get('pct_bound', float('nan')):.0f}%",
                 f"{r['vs'].get('torch-fused', float('nan')):.2f}x" if r.get("vs") else "-",
                 f"{r['vs_best_peer']:.2f}x" if "vs_best_peer" in r else "-"] for r in rs]
        r0 = rs[0]
        out.append((f"Many arrays: {key[0]} ({r0['arrays']} arrays, {r0['n'] / 1e6:.1f}M "
                    f"params), {key[1]}, {key[2]} thread{'s' if key[2] > 1 else ''}",
                    _table(["impl", "ms/step", "min-max", "ns/elem", "% of bound",
                            "speedup of this vs torch-fused", "vs best peer"], rows)))
    # sparse
    sp = [r for r in recs if r["scenario"] == "sparse"]
    for key in sorted({tuple(r[k] for k in GROUP_KEYS["sparse"]) for r in sp}):
        rs = [r for r in sp if tuple(r[k] for k in GROUP_KEYS["sparse"]) == key]
        rs = sorted(rs, key=lambda r: r["median_s"])
        rows = [[r["impl"], ("~" if disturbed(r) else "")
                 + f"{r['ms_per_step']:.3f}",
                 f"{r['min_s'] * 1e3:.3f}-{r['max_s'] * 1e3:.3f}",
                 f"{r['ns_per_touched_elem']:.2f}", f"{r.get('pct_bound', float('nan')):.0f}%",
                 f"{r['vs']['torch']:.1f}x" if r.get("vs", {}).get("torch") else "-",
                 f"{100 * r['merge_share']:.0f}%" if "merge_share" in r else ""] for r in rs]
        r0 = rs[0]
        out.append((f"Sparse: {key[0]:,} rows x {key[1]} dim, batch {key[2]} ids Zipf({key[3]}) "
                    f"-> {r0['unique_rows']:,} unique rows, {key[4]}, {key[5]} "
                    f"thread{'s' if key[5] > 1 else ''} (bound = touched rows' bytes "
                    f"{r0['touched_bytes'] / 1e6:.1f} MB at bandwidth"
                    + (f" = {r0['bound_ms']:.3f} ms)" if "bound_ms" in r0 else ")"),
                    _table(["impl", "ms/step", "min-max", "ns/touched elem", "% of bound",
                            "vs torch SparseAdam", "merge share"], rows)))
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
        out.append((f"ISA modules (kernel called directly; chosen at import: {chosen}); "
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
        "bandwidth measured in the same run. A time marked ~ was disturbed even after "
        f"re-measuring: its repeats spread more than {NOISY}x (max/min) or other processes "
        f"used more than {BUSY} CPUs meanwhile.",
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
    style = {"fastadam": dict(color="C3", lw=2.4, marker="o"),
             "fastadam.torch": dict(color="C1", marker="."),
             "torch-fused": dict(color="C0", marker="s"),
             "torch-foreach": dict(color="C9", marker="^"),
             "torch": dict(color="C2", marker="v"),
             "deepspeed": dict(color="C4", marker="D"),
             "numpy-ref": dict(color="0.5", marker="x", ls=":")}
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
                       label=f"bandwidth bound ({bnd['bound_gbs']:.0f} GB/s)")
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
            pts = sorted((r["n"], r["median_s"] / fa[r["n"]]["median_s"])
                         for r in rs if r["impl"] == impl and r["n"] in fa)
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
    for scen, keys, unit, scale in (("many", ("model", "dtype", "threads"), "ms/step", 1e3),
                                    ("sparse", GROUP_KEYS["sparse"], "ms/step", 1e3)):
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
            ttl = (f"{key[0]}, {key[1]}, {key[2]} thread(s)" if scen == "many" else
                   f"sparse {key[0]:,}x{key[1]}, batch {key[2]}, Zipf({key[3]}), "
                   f"{key[5]} thread(s)")
            ax.set_title(ttl, fontsize=10)
            ax.set_xlim(0, max(tops) * 1.22)
            fig.tight_layout()
            tag = "_".join(str(k) for k in key).replace(".", "p")
            path = os.path.join(outdir, f"{scen}_{tag}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            files.append(path)
    return files
