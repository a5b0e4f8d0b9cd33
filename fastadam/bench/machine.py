"""Design: the machine a result was measured on, and its memory bandwidth.

What: ``describe()`` records CPU, caches, memory, software versions and
fastadam's build/config with every run. ``Probe`` and ``bandwidth()`` measure
the memory bandwidth that bounds a memory-bound Adam step; ``note_bound()``
folds later (interleaved) probe measurements into the run's ONE bound per
thread count (see ``bound``). ``CpuMeter`` measures how much CPU other
processes used meanwhile (a shared machine makes every figure noisier).

Method: STREAM-style read-modify-write probes (``a += b``, 12 B/elem) on
float32 arrays far larger than the caches, from numpy (Python threads on
contiguous parts; numpy releases the GIL) and torch (``add_`` with torch's
threads); a probe round whose repeats spread more than ``bound.NOISY`` or
that other processes disturbed is re-measured (bounded), and the best
median is the bound.
"""
import concurrent.futures
import datetime
import os
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

if TYPE_CHECKING:
    import torch


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_model():
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def caches():
    out: dict[str, str] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            lvl = _read(f"{base}/{d}/level")
            typ = _read(f"{base}/{d}/type")
            size = _read(f"{base}/{d}/size")
            if lvl and size:
                out[f"L{lvl}{'d' if typ == 'Data' else 'i' if typ == 'Instruction' else ''}"] = size
    except OSError:
        pass
    return out


def mem_total_gb():
    txt = _read("/proc/meminfo") or ""
    for line in txt.splitlines():
        if line.startswith("MemTotal"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def versions():
    v: dict[str, Optional[str]] = {"python": sys.version.split()[0], "numpy": np.__version__}
    try:
        import fastadam
        v["fastadam"] = fastadam.__version__
    except Exception as e:  # pragma: no cover
        v["fastadam"] = f"unavailable: {e}"
    for mod in ("torch", "deepspeed", "matplotlib", "threadpoolctl"):
        try:
            if mod == "deepspeed":
                from importlib.metadata import version
                v[mod] = version("deepspeed")
            else:
                v[mod] = __import__(mod).__version__
        except Exception:
            v[mod] = None
    return v


def describe():
    """A dict naming the machine and software: recorded with every result."""
    ncpu_aff: Optional[int]
    try:
        ncpu_aff = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        ncpu_aff = os.cpu_count()
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": ncpu_aff,
        "caches": caches(),
        "mem_total_gb": mem_total_gb(),
        "versions": versions(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "FASTADAM_ISA", "MKL_NUM_THREADS")
                if k in os.environ},
    }
    info["fastadam_source"] = _fastadam_source()
    try:
        from fastadam import _config
        info["fastadam_config"] = _config.config()
    except Exception as e:  # pragma: no cover
        info["fastadam_config"] = {"error": repr(e)}
    return info


def _fastadam_source():
    """Where fastadam was imported from and, if a git checkout, its commit."""
    try:
        import subprocess

        import fastadam
        d = os.path.dirname(os.path.dirname(os.path.abspath(fastadam.__file__)))
        out: dict[str, Any] = {"path": d}
        r = subprocess.run(["git", "-C", d, "log", "-1", "--format=%h %s"], capture_output=True,
                           text=True, timeout=10)
        if r.returncode == 0:
            out["commit"] = r.stdout.strip()
            st = subprocess.run(["git", "-C", d, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
            out["dirty"] = bool(st.stdout.strip())
        return out
    except Exception as e:  # pragma: no cover
        return {"error": repr(e)}


def short_name(info):
    cfg = info.get("fastadam_config", {})
    return (f"{info['cpu']}, {info['usable_cpus']} cores, {info['mem_total_gb']} GB RAM, "
            f"fastadam ISA {cfg.get('isa', '?')}")


# --------------------------------------------------------------------------
# Memory-bandwidth probe
# --------------------------------------------------------------------------

class _Pool:
    def __init__(self, n):
        self.n = n
        self.ex = concurrent.futures.ThreadPoolExecutor(max_workers=n) if n > 1 else None

    def run(self, fn, *arrays):
        """fn(*slices) over n contiguous parts, one Python thread each (numpy
        releases the GIL inside the loops, so the parts run in parallel)."""
        if self.ex is None:
            fn(*arrays)
            return
        n = arrays[0].size
        bounds = [(i * n) // self.n for i in range(self.n + 1)]
        futs = [self.ex.submit(fn, *(a[bounds[i]:bounds[i + 1]] for a in arrays))
                for i in range(self.n)]
        for f in futs:
            f.result()

    def close(self):
        if self.ex is not None:
            self.ex.shutdown()


class Probe:
    """Memory-bandwidth probes on float32 arrays of ``n_elems`` elements
    (default 512 MiB each, far larger than any cache), kept for the whole run
    so they can also be interleaved with the implementations (the machine's
    bandwidth drifts: other tenants, other processes).

    Probes (STREAM-style byte counts, no write-allocate), both read-modify-write
    like Adam (a copy probe is not: streaming stores make it read faster than
    any in-place update can go, so it is not used):
      * ``update``        a += b        numpy                                 12 B/elem
      * ``torch-update``  a += b        torch ``add_`` with torch threads     12 B/elem
    With several threads, numpy runs on contiguous parts from Python threads
    (numpy releases the GIL): independent of fastadam.
    """

    INTERLEAVED = ("update", "torch-update")
    ta: Optional["torch.Tensor"]  # torch views of a and b: set when torch imports
    tb: Optional["torch.Tensor"]

    def __init__(self, n_elems=2**27, use_torch=True):
        self.n = n_elems
        # the arrays (and torch's views of them) are dropped by close()
        self.a: Optional[np.ndarray] = np.empty(n_elems, np.float32)
        self.b: Optional[np.ndarray] = np.empty(n_elems, np.float32)
        self.a.fill(1.0)
        self.b.fill(1e-7)
        self.tor = None
        if use_torch:
            try:
                import torch
                self.tor = torch
                self.ta, self.tb = torch.from_numpy(self.a), torch.from_numpy(self.b)
            except Exception:
                self.tor = None
        self._pools = {}

    def _pool(self, t):
        if t not in self._pools:
            self._pools[t] = _Pool(t)
        return self._pools[t]

    def cases(self, t, names=None):
        """name -> (fn, bytes per call); call inside ``peers.threads(t)``."""
        pool = self._pool(t)
        a, b = self.a, self.b
        out = {"update": (lambda: pool.run(lambda x, y: np.add(x, y, out=x), a, b), 12 * self.n)}
        if self.tor is not None:
            ta, tb = self.ta, self.tb
            assert ta is not None and tb is not None  # set whenever self.tor is
            out["torch-update"] = (lambda: ta.add_(tb), 12 * self.n)
        return {k: v for k, v in out.items() if names is None or k in names}

    def close(self):
        for p in self._pools.values():
            p.close()
        self._pools = {}
        self.a = self.b = self.ta = self.tb = None


def bandwidth(probe, threads=(1, 2), repeats=5, log=None, retries=2):
    """Measure memory bandwidth (GB/s, 1e9 bytes/s) with ``probe`` per thread
    count. ``bound_gbs`` is the best probe's median: the run's one bound for
    that thread count (raised later by :func:`note_bound`, never lowered). A
    round whose repeats spread more than ``bound.NOISY`` or during which
    other processes used more than ``bound.BUSY`` CPUs is re-measured, up to
    ``retries`` times; the best round is kept and ``disturbed`` says whether
    even that one was."""
    from . import bound as B
    from .peers import threads as limit_threads
    by_threads: dict[int, dict[str, Any]] = {}
    out = {"n_elems": probe.n, "bytes_per_array": probe.a.nbytes, "by_threads": by_threads}
    for t in threads:
        # res: probe name -> its figures, plus run keys ("disturbed", "bound_gbs", ...)
        best_res: Optional[dict[str, Any]] = None
        best_key: Optional[tuple[bool, float]] = None
        for attempt in range(1 + max(0, retries)):
            res: dict[str, Any] = {}
            meter = CpuMeter()
            with limit_threads(t):
                for name, (fn, nbytes) in probe.cases(t).items():
                    fn()  # warm-up
                    ts = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn()
                        ts.append(time.perf_counter() - t0)
                    gbs = [nbytes / x / 1e9 for x in ts]
                    res[name] = {"median_gbs": statistics.median(gbs), "max_gbs": max(gbs),
                                 "min_gbs": min(gbs), "bytes_per_elem": nbytes // probe.n}
            others = meter.others() or 0.0
            worst = max(v["max_gbs"] / v["min_gbs"] for v in res.values())
            disturbed = worst > B.NOISY or others > B.BUSY
            top = max(v["median_gbs"] for v in res.values())
            key = (disturbed, -top)
            if best_res is None or best_key is None or key < best_key:
                best_res, best_key = res, key
                best_res["disturbed"] = disturbed
                best_res["attempts"] = attempt + 1
            if not disturbed:
                break
            if log and attempt < retries:
                log(f"  bandwidth probe, {t} thread(s), disturbed (spread {worst:.2f}, other "
                    f"processes {others:.2f} CPUs): re-measuring")
        assert best_res is not None  # the loop runs at least once
        res = best_res
        res["attempts"] = attempt + 1
        probes = {k: v for k, v in res.items() if isinstance(v, dict)}
        best = max(probes, key=lambda k: probes[k]["median_gbs"])
        res["bound_gbs"] = probes[best]["median_gbs"]
        res["bound_probe"] = best
        res["start_gbs"] = res["bound_gbs"]
        res["measurements"] = 1
        by_threads[t] = res
        if log:
            log(f"  bandwidth, {t} thread{'s' if t > 1 else ''}: " + ", ".join(
                f"{k} {v['median_gbs']:.1f}" for k, v in probes.items())
                + f" GB/s{' (disturbed)' if res['disturbed'] else ''}")
    return out


def note_bound(bw, threads, got):
    """Fold an interleaved probe measurement ``{probe: GB/s}`` into the run's
    bound for ``threads`` (the bound only goes up: a disturbed probe reads low)."""
    if not bw or not got:
        return
    d = bw["by_threads"].get(threads)
    if d is None:
        return
    d["measurements"] = d.get("measurements", 1) + 1
    name = max(got, key=got.get)
    if got[name] > d["bound_gbs"]:
        d["bound_gbs"], d["bound_probe"] = got[name], name


def bound_for(bw, threads):
    """The run's bandwidth bound (GB/s) for a thread count (nearest measured)."""
    if not bw:
        return None
    by = bw["by_threads"]
    if threads in by:
        return by[threads]["bound_gbs"]
    keys = sorted(by)
    best = min(keys, key=lambda k: abs(k - threads))
    return by[best]["bound_gbs"]


class CpuMeter:
    """CPU time used by OTHER processes during a run (in CPUs, averaged): a
    busy machine makes every number noisier, so the run records it."""

    def __init__(self):
        self.t0 = time.time()
        self.s0 = self._stat()
        self.own0 = self._own()

    @staticmethod
    def _stat():
        txt = _read("/proc/stat") or ""
        for line in txt.splitlines():
            if line.startswith("cpu "):
                f = [int(x) for x in line.split()[1:]]
                idle = f[3] + (f[4] if len(f) > 4 else 0)
                return sum(f[:8]) - idle  # busy jiffies
        return None

    @staticmethod
    def _own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self):
        s1 = self._stat()
        if s1 is None or self.s0 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy = (s1 - self.s0) / hz
        wall = max(1e-9, time.time() - self.t0)
        return max(0.0, (busy - (self._own() - self.own0)) / wall)
