"""Design: the ``soak`` scenario: memory stays flat over many steps and many optimizers.

What: two phases. ``small``: many steps (10**5 by default) on small arrays;
``large``: fewer steps (10**3) on large ones (2**22 elements). Each phase
cycles through the optimizer kinds -- numpy ``fastadam.Adam``/``AdamW``/
``SparseAdam`` and, when torch is installed, ``fastadam.torch.Adam``/
``AdamW``/``SparseAdam`` and a mixed dense+sparse ``fastadam.torch.Adam`` --
building a fresh optimizer (fresh parameters; a torch optimizer also loads
its predecessor's ``state_dict``) every block of steps and dropping it after.

Method: at block boundaries (no optimizer alive, after ``gc.collect()``;
three in warm-up, ``SAMPLES`` after it) the resident set size (``VmRSS`` of
``/proc/self/status``) and ``tracemalloc``'s current and peak traced sizes are read. The first
``WARMUP`` fraction of the blocks (at least one round of every kind) is
warm-up: allocator pools, caches and the kernels' workspaces settle there.
After it, growth = max(sample) - (the sample at the end of warm-up); the
phase fails (``failed: True`` on its summary record, non-zero exit status of
``python -m fastadam.bench``) if RSS grows by more than ``RSS_TOL_MIB`` (or
``RSS_TOL_ARRAYS`` arrays of the phase's size, if more) or the traced size by
more than ``TRACED_TOL_KIB``.
"""
import gc
import os
import time
import tracemalloc
from typing import Any, Callable, Optional

import numpy as np

# RSS after warm-up may rise by RSS_TOL_MIB or RSS_TOL_ARRAYS arrays of the phase's
# size (float32), whichever is more: freed large blocks are not always returned to the
# system at once (allocator arenas, torch's CPU allocator), so RSS moves up and down by
# a few arrays; a leak of one array per optimizer exceeds this within the phase. The
# traced size (numpy's buffers are traced; torch's are not) gets a flat 256 KiB:
# bounded caches (hyperparameter scalars: 1024 entries) fill after warm-up.
RSS_TOL_MIB = 8.0
RSS_TOL_ARRAYS = 8
TRACED_TOL_KIB = 256.0
WARMUP = 0.2
SAMPLES = 10           # samples after warm-up (rows of the report), plus 3 in warm-up


def rss_bytes() -> Optional[int]:
    """Resident set size from /proc/self/status (None where there is no procfs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- the optimizer kinds: make(n, rng) -> step() closure (holding the optimizer) ------------

def _np_dense(cls_name: str) -> Callable[..., Any]:
    def make(n: int, rng: Any, prev: Any) -> Any:
        import fastadam as fa
        ps = [rng.standard_normal(n).astype(np.float32),
              rng.standard_normal((8, max(1, n // 64))).astype(np.float32)]
        gs = [np.ones_like(p) * 1e-3 for p in ps]
        opt = getattr(fa, cls_name)(ps, lr=1e-3)
        if prev is not None:
            opt.load_state_dict(prev)

        def step() -> None:
            opt.step(gs)
        return step, opt
    return make


def _np_sparse(n: int, rng: Any, prev: Any) -> Any:
    import fastadam as fa
    rows = max(16, n // 16)
    t = rng.standard_normal((rows, 16)).astype(np.float32)
    ids = rng.integers(0, rows, 64)
    g = np.ones((64, 16), np.float32) * 1e-3
    opt = fa.SparseAdam(t, lr=1e-3)

    def step() -> None:
        opt.step(ids, g)
    return step, opt


def _torch_dense(cls_name: str) -> Callable[..., Any]:
    def make(n: int, rng: Any, prev: Any) -> Any:
        import torch

        import fastadam.torch as fat
        ps = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32))),
              torch.nn.Parameter(torch.zeros(max(1, n // 64), 8).t())]   # permuted layout
        for p in ps:
            p.grad = torch.full(p.shape, 1e-3)
        opt = getattr(fat, cls_name)(ps, lr=1e-3)
        if prev is not None:
            opt.load_state_dict(prev)

        def step() -> None:
            opt.step()
        return step, opt
    return make


def _embedding(n: int, rng: Any) -> Any:
    """An embedding table of ``n`` elements (rows of 16) with a sparse gradient
    of 64 random rows."""
    import torch
    rows = max(16, n // 16)
    emb = torch.nn.Parameter(torch.zeros(rows, 16))
    ix = torch.from_numpy(rng.integers(0, rows, (1, 64)))
    emb.grad = torch.sparse_coo_tensor(ix, torch.full((64, 16), 1e-3), (rows, 16),
                                       check_invariants=False)
    return emb


def _torch_sparse(n: int, rng: Any, prev: Any) -> Any:
    import fastadam.torch as fat
    emb = _embedding(n, rng)
    opt = fat.SparseAdam([emb], lr=1e-3)
    if prev is not None:
        opt.load_state_dict(prev)

    def step() -> None:
        opt.step()
    return step, opt


def _torch_mixed(n: int, rng: Any, prev: Any) -> Any:
    import torch

    import fastadam.torch as fat
    emb = _embedding(n, rng)
    w = torch.nn.Parameter(torch.zeros(n))
    w.grad = torch.full((n,), 1e-3)
    opt = fat.Adam([{"params": [w]}, {"params": [emb], "lr": 1e-2}], lr=1e-3)
    if prev is not None:
        opt.load_state_dict(prev)

    def step() -> None:
        opt.step()
    return step, opt


def kinds(with_torch: Optional[bool] = None) -> dict[str, Callable[..., Any]]:
    """The optimizer kinds of the soak, by name (torch's when importable)."""
    out: dict[str, Callable[..., Any]] = {
        "fastadam.Adam": _np_dense("Adam"), "fastadam.AdamW": _np_dense("AdamW"),
        "fastadam.SparseAdam": _np_sparse}
    if with_torch is None:
        try:
            import torch  # noqa: F401
            with_torch = True
        except ImportError:
            with_torch = False
    if with_torch:
        out.update({"fastadam.torch.Adam": _torch_dense("Adam"),
                    "fastadam.torch.AdamW": _torch_dense("AdamW"),
                    "fastadam.torch.SparseAdam": _torch_sparse,
                    "fastadam.torch.Adam(mixed)": _torch_mixed})
    return out


def phase(name: str, steps: int, n: int, block: int, *, with_torch: Optional[bool] = None,
          rss_tol_mib: Optional[float] = None, traced_tol_kib: Optional[float] = None,
          log: Optional[Callable[[str], None]] = None) -> list[dict[str, Any]]:
    """Run one soak phase: ``steps`` steps on arrays of ``n`` elements, a fresh
    optimizer every ``block`` steps, the kinds in turn. Returns the sample
    records (``scenario="soak"``) and one summary (``scenario="soak-summary"``)."""
    ks = kinds(with_torch)
    names = list(ks)
    n_blocks = max(2 * len(names), -(-steps // block))
    block = max(1, steps // n_blocks)
    warm_blocks = max(len(names), int(n_blocks * WARMUP))
    rss_tol = max(RSS_TOL_MIB, RSS_TOL_ARRAYS * n * 4 / 2**20) if rss_tol_mib is None \
        else rss_tol_mib
    tr_tol = TRACED_TOL_KIB if traced_tol_kib is None else traced_tol_kib
    # sample (after gc.collect(): not cheap with torch loaded) at the end of warm-up
    # and at ~SAMPLES evenly spaced blocks after it
    after_blocks = n_blocks - warm_blocks
    sample_at = {warm_blocks - 1, n_blocks - 1} | {
        warm_blocks - 1 + (after_blocks * k) // SAMPLES for k in range(1, SAMPLES + 1)} | {
        (warm_blocks * k) // 3 for k in range(1, 3)}
    rng = np.random.default_rng(0)
    started = tracemalloc.is_tracing()
    if not started:
        tracemalloc.start()
    samples: list[dict[str, Any]] = []
    prev: dict[str, Any] = {}
    t0 = time.perf_counter()
    done = 0
    try:
        for b in range(n_blocks):
            kind = names[b % len(names)]
            step, opt = ks[kind](n, rng, prev.get(kind))
            for _ in range(block):
                step()
            done += block
            prev[kind] = _detached(opt.state_dict())
            del step, opt
            if b not in sample_at:
                continue
            gc.collect()
            cur, peak = tracemalloc.get_traced_memory()
            samples.append({"block": b, "steps": done, "kind": kind, "rss": rss_bytes(),
                            "traced": cur, "traced_peak": peak,
                            "elapsed_s": time.perf_counter() - t0})
    finally:
        if not started:
            tracemalloc.stop()
    wi = next(i for i, sm in enumerate(samples) if sm["block"] == warm_blocks - 1)
    base = samples[wi]
    after = samples[wi + 1:]
    have_rss = base["rss"] is not None
    rss_growth = (max(s["rss"] for s in after) - base["rss"]) / 2**20 if have_rss else None
    tr_growth = (max(s["traced"] for s in after) - base["traced"]) / 2**10
    failed = (rss_growth is not None and rss_growth > rss_tol) or tr_growth > tr_tol
    recs = []
    for i, s in enumerate(samples):
        recs.append({"scenario": "soak", "impl": "fastadam", "phase": name, "n": n,
                     "steps": s["steps"], "kind": s["kind"], "warmup": i <= wi,
                     "rss_mib": None if s["rss"] is None else s["rss"] / 2**20,
                     "traced_mib": s["traced"] / 2**20,
                     "traced_peak_mib": s["traced_peak"] / 2**20,
                     "elapsed_s": s["elapsed_s"]})
    summary = {"scenario": "soak-summary", "impl": "fastadam", "phase": name, "n": n,
               "steps": done, "optimizers": n_blocks, "kinds": names,
               "warmup_steps": base["steps"],
               "rss_growth_mib": rss_growth, "rss_tol_mib": rss_tol,
               "traced_growth_kib": tr_growth, "traced_tol_kib": tr_tol,
               "rss_start_mib": samples[0]["rss"] / 2**20 if have_rss else None,
               "rss_base_mib": base["rss"] / 2**20 if have_rss else None,
               "traced_peak_mib": max(s["traced_peak"] for s in samples) / 2**20,
               "duration_s": time.perf_counter() - t0, "failed": bool(failed),
               "samples": [{k: s[k] for k in ("steps", "rss", "traced")} for s in samples]}
    if log:
        log(f"  soak {name}: {done} steps, {n_blocks} optimizers, RSS growth "
            f"{'n/a' if rss_growth is None else f'{rss_growth:+.2f} MiB'} (tol {rss_tol}), "
            f"traced growth {tr_growth:+.1f} KiB (tol {tr_tol})"
            + (" -- FAILED" if failed else ""))
    return recs + [summary]


def _detached(sd: Any) -> Any:
    """A state dict whose tensors/arrays are copies (the next optimizer's parameters
    are new; the old ones must be freeable)."""
    import copy
    return copy.deepcopy(sd)


def env_steps(default: tuple[int, int]) -> tuple[int, int]:
    """(small, large) step counts; ``FASTADAM_SOAK_STEPS=small,large`` overrides."""
    s = os.environ.get("FASTADAM_SOAK_STEPS")
    if not s:
        return default
    a, b = (int(float(x)) for x in s.split(","))
    return a, b
