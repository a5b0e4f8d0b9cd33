"""Design: the command line, ``python -m fastadam.bench [--quick | --smoke] [filters] [--out DIR]``.

What: modes (full, ``--quick``, ``--smoke``) choose sizes, models, workloads
and repeats; filters (``--scenario``, ``--peers``, ``--sizes``, ...) narrow
them. ``main`` measures the machine's bandwidth once (the run's one bound,
``bound``), runs the scenarios, prints each one's tables as it finishes and
writes results.json, results.md and the plots, all from the same final bound.
"""
import argparse
import math
import os
import re
import sys
import time
from typing import Any, Optional, TypedDict

from . import bound as B
from . import machine, report
from . import peers as P
from . import scenarios as S
from . import train as T
from .timing import Progress

EPILOG = """\
modes:
  (default)  the full run: every size 2**4..2**26, float32 and float64, threads 1..N,
             GPT-2 small and BERT-base (numpy API and torch drop-ins), four sparse
             workloads (fixed and cycling batches), the torch-level sparse cases,
             ISA and threshold sweeps
  --quick    the README command: float32, N threads, the key sizes, GPT-2 small, the
             torch drop-ins on 1 and 148 tensors of 16 elements and one of 2**20 (GPT-2
             small and BERT-base shapes at the torch level: full run), a training step
             of the MLP, step-in-backward memory, the default sparse workload, ISA and
             threshold (about 2 minutes on 2 cores); no torch-sparse
  --smoke    seconds; proves the suite runs (CI). Never asserts timings.

examples:
  python -m fastadam.bench --quick
  python -m fastadam.bench --scenario dense --dtype float32 --threads 1,2 --sizes 2**16,2**20
  python -m fastadam.bench --scenario many,overhead \
--peers fastadam,fastadam.Adam,torch-fused,deepspeed
  python -m fastadam.bench --scenario sparse --sparse 1000000x64x16384x1.1 --out /tmp/res
  python -m fastadam.bench --scenario torch --torch-models gpt2-small,bert-base,148x16,1x2^24
  python -m fastadam.bench --scenario train,backward-memory
  python -m fastadam.bench --scenario torch-sparse
  python -m fastadam.bench --scenario sparse --sparse-batches fixed,cycling --threads 1,2
  python -m fastadam.bench --scenario soak          (on request only; --soak-steps 1e5,1e3)
"""


def parse_size(tok):
    tok = tok.strip().replace("_", "")
    m = re.fullmatch(r"(\d+)\s*\*\*\s*(\d+)", tok) or re.fullmatch(r"(\d+)\^(\d+)", tok)
    if m:
        return int(m.group(1)) ** int(m.group(2))
    m = re.fullmatch(r"1<<(\d+)", tok)
    if m:
        return 1 << int(m.group(1))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG])", tok)
    if m:
        return int(float(m.group(1)) * {"k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()])
    return int(float(tok))


def parse_sizes(s):
    """``2**16,2**20`` or ``1000,65536`` or ``2**4..2**26`` (every power of two)."""
    out = []
    for part in s.split(","):
        if ".." in part:
            lo, hi = (parse_size(x) for x in part.split(".."))
            k = math.ceil(math.log2(lo))
            while 2**k <= hi:
                out.append(2**k)
                k += 1
        elif part.strip():
            out.append(parse_size(part))
    if any(n < 1 for n in out):
        raise argparse.ArgumentTypeError("sizes must be >= 1")
    return sorted(set(out))


def parse_sparse(s):
    out = []
    for part in s.split(","):
        f = part.lower().split("x")
        if len(f) != 4:
            raise argparse.ArgumentTypeError(
                f"--sparse wants ROWSxDIMxBATCHxZIPF (e.g. 1000000x64x16384x1.1), got {part!r}")
        out.append((parse_size(f[0]), parse_size(f[1]), parse_size(f[2]), float(f[3])))
    return out


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser():
    ap = argparse.ArgumentParser(
        prog="python -m fastadam.bench",
        description="fastadam microbenchmarks: peers side by side, "
        "interleaved, against the machine's measured memory bandwidth.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the README run (< 2 min here)")
    mode.add_argument("--smoke", action="store_true", help="seconds; for CI")
    ap.add_argument("--scenario", type=_csv, default=None,
                    help="comma list of: " + ", ".join(S.SCENARIOS) + " (default: all)")
    ap.add_argument("--dtype", type=_csv, default=None, help="float32,float64")
    ap.add_argument("--threads", type=lambda s: sorted({int(x) for x in _csv(s)}), default=None,
                    help="comma list of thread counts (default: N for --quick, 1..N full)")
    ap.add_argument("--peers", type=_csv, default=None,
                    help="comma list of implementations to run (default: all; see --list); "
                         "'all' includes DeepSpeed in --smoke")
    ap.add_argument("--sizes", type=parse_sizes, default=None,
                    help="dense and isa sizes: 2**16,2**20 or 16,65536 or 2**4..2**26")
    ap.add_argument("--models", type=_csv, default=None,
                    help="many-arrays models: " + ", ".join(S.MODELS))
    ap.add_argument("--torch-models", type=_csv, default=None,
                    help="torch scenario models: " + ", ".join(S.TORCH_MODELS))
    ap.add_argument("--sparse-batches", type=_csv, default=None,
                    help="sparse scenario: fixed (the same batch every step: warm rows), "
                         "cycling (a stream of 16 batches in turn: cold rows), busy (the "
                         "stream with one core kept busy by another process), dense (the "
                         "dense-equivalent mode vs torch fused AdamW on the whole table); "
                         "default: fixed; all four in the full run")
    ap.add_argument("--sparse", type=parse_sparse, default=None, metavar="RxDxBxZ",
                    help="sparse workloads ROWSxDIMxBATCHxZIPF, comma separated "
                         "(Zipf 0 = uniform); default 1000000x64x16384x1.1")
    ap.add_argument("--soak-steps", type=lambda s: tuple(parse_size(x) for x in _csv(s)),
                    default=None, metavar="SMALL,LARGE",
                    help="soak scenario: steps on small and on large arrays "
                         "(default 10**5,10**3)")
    ap.add_argument("--sparse-scale", type=_csv, default=None,
                    help="sparse-scale scenario: " + ", ".join(S.SCALE_CONFIGS)
                    + " (default: ram,memmap)")
    ap.add_argument("--scale-dir", default=None, metavar="DIR",
                    help="sparse-scale: folder of the memmap files (default: the temp folder)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per case")
    ap.add_argument("--target-ms", type=float, default=None,
                    help="length of one timed sample (calls are batched up to this)")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-measure a case whose repeats spread > 1.5x (max/min) up to this "
                         "many times (default: 1 in the full run, 0 in --quick/--smoke); a "
                         "case above the bandwidth bound is always re-measured (up to "
                         f"{B.RETRIES} times) and marked disturbed if it stays above")
    ap.add_argument("--out", default="bench_results", help="results folder (default: %(default)s)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS",
                    help="first wait (up to SECONDS) until other processes use < 0.15 CPUs "
                         "(shared machines)")
    ap.add_argument("--render", metavar="JSON",
                    help="no measuring: re-make tables, results.md and plots from a results.json")
    ap.add_argument("--list", action="store_true", help="list scenarios and peers, then exit")
    return ap


class Run:
    """Everything a scenario needs: what to run and where to report."""

    def __init__(self, args):
        ncpu = machine.describe()["usable_cpus"] or 1
        self.ncpu = ncpu
        if args.smoke:
            self.mode = "smoke"
            sizes = [2**4, 2**10, 2**14]
            self.dtypes, self.threads = ["float32"], [ncpu]
            self.repeats, self.target_s = 3, 0.002
            self.bw_elems, self.bw_repeats = 2**20, 2
            self.models = ["tiny"]
            self.sparse_configs = [(10_000, 16, 256, 1.1)]
            self.isa_sizes = [2**10]
            self.threshold_sizes = [2**10, 2**12, 2**14]
            self.dense_variants = [("adam", sizes)]
            self.threads_many = [ncpu]
            self.torch_models = ["1x16", "148x16", "tiny"]
            self.train_models = ["mlp"]
            self.memory_model = (4, 256, 4)      # layers, width, batch
            self.skipgram = (20_000, 32, 1024, 1.0)
            self.mixed = (20_000, 16, 64, 4)
            self.sparse_batches = ["fixed", "cycling", "dense"]
            self.isa_rounds = 1
            self.precision_sizes, self.precision_models = [2**10], ["tiny"]
            default_scenarios = [s for s in S.SCENARIOS if s not in S.ON_REQUEST]
        elif args.quick:
            self.mode = "quick"
            sizes = [2**4, 2**8, 2**12, 2**16, 2**20, 2**23, 2**26]
            self.dtypes, self.threads = ["float32"], [ncpu]
            self.repeats, self.target_s = 5, 0.02
            self.bw_elems, self.bw_repeats = 2**27, 3
            self.models = ["gpt2-small"]
            self.sparse_configs = [(1_000_000, 64, 16384, 1.1)]
            self.isa_sizes = [2**16, 2**20]
            self.threshold_sizes = _geom(2**10, 2**18, 2)
            self.dense_variants = [("adam", sizes)]
            self.threads_many = [ncpu]
            self.torch_models = ["1x16", "148x16", "1x2^20"]
            self.train_models = ["mlp"]
            self.memory_model = (16, 1024, 8)
            self.skipgram = (1_000_000, 128, 4096 * 9, 1.0)
            self.mixed = (1_000_000, 64, 2048, 20)
            self.sparse_batches = ["fixed"]
            self.isa_rounds = 2
            self.precision_sizes, self.precision_models = [2**16, 2**26], ["gpt2-small"]
            default_scenarios = [s for s in S.SCENARIOS
                                 if s != "torch-sparse" and s not in S.ON_REQUEST]
        else:
            self.mode = "full"
            sizes = [2**k for k in range(4, 27)]
            self.dtypes, self.threads = ["float32", "float64"], list(range(1, ncpu + 1))
            self.repeats, self.target_s = 7, 0.04
            self.bw_elems, self.bw_repeats = 2**27, 7
            self.models = ["gpt2-small", "bert-base"]
            self.sparse_configs = [(1_000_000, 64, 16384, 1.1), (1_000_000, 64, 16384, 0.0),
                                   (1_000_000, 64, 131072, 1.1), (10_000_000, 32, 16384, 1.1)]
            self.isa_sizes = [2**12, 2**16, 2**20, 2**24]
            self.threshold_sizes = _geom(2**10, 2**19, 4)
            self.dense_variants = [("adam", sizes), ("adamw", [2**16, 2**20, 2**24])]
            self.threads_many = list(range(1, ncpu + 1))
            self.torch_models = ["gpt2-small", "bert-base", "1x16", "148x16", "gpt2-w64",
                                 "1x2^24"]
            self.train_models = ["mlp", "transformer"]
            self.memory_model = (16, 1024, 8)
            # skip-gram: batch 4096 x (window 4 + negatives 5) ids, Zipf(1.0)
            self.skipgram = (1_000_000, 128, 4096 * 9, 1.0)
            self.mixed = (1_000_000, 64, 2048, 20)  # rows, dim, batch, ids per bag
            self.sparse_batches = ["fixed", "cycling", "busy", "dense"]
            self.isa_rounds = 3
            self.precision_sizes = [2**16, 2**20, 2**26]
            self.precision_models = ["gpt2-small"]
            default_scenarios = [s for s in S.SCENARIOS if s not in S.ON_REQUEST]
        self.threads_isa = sorted({1, ncpu}) if self.mode != "smoke" else [ncpu]
        self.dtypes_many = ["float32"]
        self.dtypes_sparse = ["float32"]
        if args.dtype:
            bad = [d for d in args.dtype if d not in ("float32", "float64")]
            if bad:
                raise SystemExit(f"--dtype: unknown {bad}; use float32,float64")
            self.dtypes = self.dtypes_many = self.dtypes_sparse = args.dtype
        if args.threads:
            self.threads = self.threads_many = self.threads_isa = args.threads
        if args.sizes:
            self.dense_variants = [("adam", args.sizes)]
            self.isa_sizes = args.sizes
            self.precision_sizes = args.sizes
        if args.models:
            bad = [m for m in args.models if m not in S.MODELS]
            if bad:
                raise SystemExit(f"--models: unknown {bad}; use {', '.join(S.MODELS)}")
            self.models = self.precision_models = args.models
        if args.sparse:
            self.sparse_configs = args.sparse
        if args.torch_models:
            bad = [m for m in args.torch_models if m not in S.TORCH_MODELS]
            if bad:
                raise SystemExit(f"--torch-models: unknown {bad}; use "
                                 f"{', '.join(S.TORCH_MODELS)}")
            self.torch_models = args.torch_models
        if args.sparse_batches:
            bad = [b for b in args.sparse_batches if b not in S.SPARSE_MODES]
            if bad:
                raise SystemExit(f"--sparse-batches: unknown {bad}; use "
                                 f"{','.join(S.SPARSE_MODES)}")
            self.sparse_batches = args.sparse_batches
        # --quick keeps its 2-minute budget (no re-measuring; disturbed cells are marked ~)
        self.retries = 1 if self.mode == "full" else 0
        if args.retries is not None:
            self.retries = max(0, args.retries)
        if args.repeats:
            self.repeats = max(1, args.repeats)
        if args.target_ms:
            self.target_s = args.target_ms / 1e3
        known = (set(P.DENSE) | set(S.SPARSE) | set(S.MIXED) | set(S.Q8_PEERS) | set(T.TRAIN)
                 | {"all"})
        if args.peers:
            bad = [p for p in args.peers if p not in known]
            if bad:
                raise SystemExit(f"--peers: unknown {bad}; known: {', '.join(sorted(known))}")
        if args.peers and "all" in args.peers:
            self.peers = None
        elif args.peers:
            self.peers = set(args.peers)
        elif self.mode == "smoke":  # DeepSpeed's import + set-up alone takes seconds
            self.peers = (set(P.DENSE) | set(S.SPARSE) | set(S.MIXED)
                          | set(S.Q8_PEERS) | set(T.TRAIN)) - {"deepspeed"}
        else:
            self.peers = None
        self.soak_steps = args.soak_steps or (10**5, 10**3)
        self.sparse_scale = args.sparse_scale or ["ram", "memmap"]
        bad = [c for c in self.sparse_scale if c not in S.SCALE_CONFIGS]
        if bad:
            raise SystemExit(f"--sparse-scale: unknown {bad}; use {','.join(S.SCALE_CONFIGS)}")
        self.scale_dir = args.scale_dir
        self.scenarios = args.scenario or default_scenarios
        bad = [s for s in self.scenarios if s not in S.SCENARIOS]
        if bad:
            raise SystemExit(f"--scenario: unknown {bad}; use {', '.join(S.SCENARIOS)}")
        self.out = args.out
        self.skipped = []
        self.bw = None
        self.probe = None
        self.llc = B.llc_bytes(machine.caches())
        self.progress = Progress(1, enabled=False)
        self.show_progress = not args.no_progress

    def repeats_for(self, n):
        return min(self.repeats, 5) if n >= 2**24 else self.repeats

    def log(self, msg):
        if self.progress.enabled and self.progress.tty:
            sys.stderr.write("\r" + " " * 120 + "\r")
        print(msg, flush=True)


def _geom(lo, hi, per_octave):
    out: list[int] = []
    k = 0
    while True:
        n = int(round(lo * 2 ** (k / per_octave) / 16)) * 16
        if n > hi:
            return out
        out.append(n)
        k += 1


class Result(TypedDict):
    """What results.json holds (``render`` reads it back)."""

    meta: dict[str, Any]
    bandwidth: Optional[dict[str, Any]]  # machine.bandwidth(), when measured
    results: list[dict[str, Any]]  # one record per measurement (see report)
    skipped: list[str]
    errors: list[str]


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list:
        print("scenarios:")
        for k, (_, _, d) in S.SCENARIOS.items():
            print(f"  {k:10s} {d}")
        for title, table in (("dense/many/overhead implementations", P.DENSE),
                             ("sparse implementations", S.SPARSE),
                             ("torch scenario models", S.TORCH_MODELS),
                             ("torch-sparse mixed model", S.MIXED)):
            print(f"{title}:")
            for k, (_, d) in table.items():
                print(f"  {k:20s} {d}")
        return 0
    if args.render:
        return render(args.render, args.out, plots=not args.no_plots)
    P.env_quiet()
    run = Run(args)
    if args.wait_idle > 0:
        _wait_idle(args.wait_idle, run.log)
    t_start = time.time()
    meter = machine.CpuMeter()
    os.makedirs(run.out, exist_ok=True)
    info = machine.describe()
    cmd = "python -m fastadam.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    setting_keys = ("dtypes", "threads", "repeats", "target_s", "models", "sparse_configs",
                    "isa_sizes", "threshold_sizes", "dense_variants", "threads_many",
                    "threads_isa", "scenarios", "torch_models", "train_models",
                    "memory_model", "skipgram", "mixed", "sparse_batches", "isa_rounds", "llc")
    meta = {"command": cmd.strip(), "mode": run.mode, "machine": info,
            "date_utc": info["date_utc"], "loadavg_start": _loadavg(),
            "settings": {k: v for k, v in vars(run).items() if k in setting_keys},
            "peers": sorted(run.peers) if run.peers else "all"}
    result: Result = {"meta": meta, "bandwidth": None, "results": [], "skipped": run.skipped,
                      "errors": []}
    print(f"fastadam bench ({run.mode}) on {machine.short_name(info)}; "
          f"threads {run.threads}; results -> {run.out}/", flush=True)
    if "torch" not in sys.modules:
        try:
            P.torch_mod()
        except P.Skip as e:
            run.log(f"skip torch peers: {e}")
            run.skipped.append(str(e))
    needs_bw = any(s in run.scenarios for s in ("dense", "many", "torch", "sparse",
                                                "torch-sparse", "isa", "q8"))
    if needs_bw:
        run.log(f"measuring memory bandwidth ({run.bw_elems * 4 / 2**20:.0f} MiB arrays)...")
        bw_threads = sorted(set(run.threads) | set(run.threads_many))
        run.probe = machine.Probe(run.bw_elems)
        run.bw = machine.bandwidth(run.probe, threads=bw_threads, repeats=run.bw_repeats,
                                   log=run.log)
        result["bandwidth"] = run.bw
        run.log(report.bound_line(run.bw))
    S._RUN = run
    total = sum(S.SCENARIOS[s][1](run) for s in run.scenarios)
    run.progress = Progress(total, label="bench", enabled=run.show_progress)
    json_path = os.path.join(run.out, "results.json")
    for name in run.scenarios:
        fn = S.SCENARIOS[name][0]
        t0 = time.time()
        try:
            recs = fn(run)
        except MemoryError:
            run.log(f"scenario {name}: out of memory, skipped (try smaller --sizes/--models)")
            result["errors"].append(f"{name}: MemoryError")
            continue
        except Exception as e:  # report, keep going, exit non-zero at the end
            import traceback
            run.progress.close()
            run.log(f"scenario {name} FAILED: {type(e).__name__}: {e}\n"
                    + traceback.format_exc())
            result["errors"].append(f"{name}: {type(e).__name__}: {e}")
            continue
        report.finalize(recs, run.bw, run.llc)
        for r in recs:   # a record may flag a failed check (the soak's tolerances)
            if r.get("failed"):
                result["errors"].append(f"{name}: {r.get('phase', r['impl'])} failed its check")
        cfg = info.get("fastadam_config", {})
        for r in recs:  # the machine, compactly, with every result (full record in meta)
            r.update(cpu=info["cpu"], cores=info["usable_cpus"], isa_module=cfg.get("isa"),
                     fastadam=info["versions"].get("fastadam"))
        result["results"].extend(recs)
        run.progress.close()
        sub = dict(result, results=recs)
        for title, tb in report.tables(dict(sub, bandwidth=None)):
            print("\n" + report.render_terminal(title, tb), flush=True)
        run.log(f"  ({name}: {time.time() - t0:.0f} s)")
        result["meta"]["duration_s"] = time.time() - t_start
        report.write_json(result, json_path)
    run.progress.close()
    report.finalize(result["results"], run.bw, run.llc)  # the final bound, for everything
    result["meta"]["duration_s"] = time.time() - t_start
    result["meta"]["loadavg_end"] = _loadavg()
    result["meta"]["others_cpu"] = meter.others()
    if (result["meta"]["others_cpu"] or 0) > 0.2:
        run.log(f"note: other processes used {result['meta']['others_cpu']:.2f} CPUs on average "
                "during this run; timings are noisier than on an idle machine")
    report.write_json(result, json_path)
    md_path = os.path.join(run.out, "results.md")
    with open(md_path, "w") as f:
        f.write(report.markdown(result))
    files = [json_path, md_path]
    if not args.no_plots:
        files += report.plots(result, run.out, log=run.log)
    if run.bw:
        print("\n" + report.render_terminal(*report.tables(dict(result, results=[]))[0]))
        print(report.bound_line(run.bw))
    print(f"\ndone in {result['meta']['duration_s']:.0f} s; wrote " + ", ".join(files))
    if result["errors"]:
        print("errors: " + "; ".join(result["errors"]))
        return 1
    return 0


def render(path, out, plots=True):
    import json
    with open(path) as f:
        result = json.load(f)
    result["bandwidth"] and result["bandwidth"].update(by_threads={
        int(k): v for k, v in result["bandwidth"]["by_threads"].items()})
    llc = result["meta"].get("settings", {}).get("llc") or B.llc_bytes(
        result["meta"]["machine"].get("caches"))
    report.finalize(result["results"], result["bandwidth"], llc)
    for title, tb in report.tables(result):
        print("\n" + report.render_terminal(title, tb))
    os.makedirs(out, exist_ok=True)
    md = os.path.join(out, "results.md")
    with open(md, "w") as f:
        f.write(report.markdown(result))
    files = [md] + (report.plots(result, out) if plots else [])
    print("\nwrote " + ", ".join(files))
    return 0


def _wait_idle(limit_s, log):
    t0 = time.time()
    while True:
        m = machine.CpuMeter()
        time.sleep(3)
        busy = m.others() or 0.0
        if busy < 0.15:
            log(f"machine idle (other processes: {busy:.2f} CPUs); starting")
            return
        if time.time() - t0 > limit_s:
            log(f"machine still busy after {limit_s:.0f} s (other processes: {busy:.2f} "
                "CPUs); starting anyway")
            return


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
