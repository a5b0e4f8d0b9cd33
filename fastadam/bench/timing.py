"""Design: interleaved timing and a dependency-free progress bar.

What: ``interleave`` times several callables (the implementations of one
case) in the same process; ``measure`` re-measures a disturbed set (bounded);
``Progress`` is the progress bar.

Method: warm-up, calibration of the batch length (``inner`` back-to-back
calls per sample, ~``target_s``), then rounds that run every case once in
alternating order (A B C, C B A, ...) with the garbage collector off;
medians and min/max per case. Disturbed = repeats spread more than 1.5x
(max/min) or other processes used more than 0.25 CPUs meanwhile.
"""
import gc
import math
import statistics
import sys
import time
from typing import Any, Optional

_now = time.perf_counter


def _time_calls(fn, inner):
    t0 = _now()
    for _ in range(inner):
        fn()
    return (_now() - t0) / inner


def interleave(cases, *, repeats, target_s, warmup=2, max_inner=100_000):
    """Time each callable in ``cases`` (name -> fn), interleaved.

    Each case is warmed up (``warmup`` calls, which also triggers lazy state
    creation and first touch of memory), then calibrated so that one sample
    (``inner`` back-to-back calls) lasts about ``target_s``. Then ``repeats``
    rounds run every case once per round, alternating the order (A B C, C B A,
    ...) so slow drift and position effects hit all cases alike.

    Returns ``{name: {"median": s, "min": s, "max": s, "samples": [...], "inner": k}}``
    with seconds per call.
    """
    names = list(cases)
    inner = {}
    for name in names:
        fn = cases[name]
        for _ in range(warmup):
            fn()
        # calibrate: double the inner count until a batch takes >= target/4
        k, t = 1, _time_calls(fn, 1)
        while t * k < target_s / 4 and k < max_inner:
            k = min(max_inner, k * 4 if t * k < target_s / 64 else k * 2)
            t = _time_calls(fn, k)
        inner[name] = max(1, min(max_inner, int(math.ceil(target_s / max(t, 1e-9)))))
        if t >= target_s:
            inner[name] = 1
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                samples[name].append(_time_calls(cases[name], inner[name]))
    finally:
        if gc_was:
            gc.enable()
    return {name: {"median": statistics.median(s), "min": min(s), "max": max(s),
                   "samples": s, "inner": inner[name]} for name, s in samples.items()}


class Progress:
    """A plain progress bar on stderr (a line every ~10% when not a terminal)."""

    def __init__(self, total, label="", enabled=True, stream=None):
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = _now()
        self._last_decile = -1

    def update(self, what="", n=1):
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        frac = self.done / self.total
        el = _now() - self.t0
        eta = el / frac - el if frac > 0 else 0.0
        if self.tty:
            width = 28
            fill = int(round(frac * width))
            bar = "#" * fill + "." * (width - fill)
            msg = (f"\r{self.label} [{bar}] {self.done}/{self.total} {el:5.0f}s"
                   f" eta {eta:4.0f}s {what}")
            self.stream.write(msg[:120].ljust(120))
            self.stream.flush()
        else:
            dec = int(frac * 10)
            if dec != self._last_decile:
                self._last_decile = dec
                self.stream.write(f"{self.label} {self.done}/{self.total} ({frac:4.0%}) "
                                  f"{el:.0f}s {what}\n")
                self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
            self.stream.flush()


def spread(r):
    """max/min of a case's samples: ~1.0-1.2 on a quiet machine."""
    return r["max"] / r["min"] if r["min"] > 0 else float("inf")


def measure(cases, *, repeats, target_s, warmup=2, retries=2, noisy=1.5, busy=0.25,
            max_inner=100_000):
    """:func:`interleave`, re-measured (up to ``retries`` more times) when it was
    disturbed: some case's samples spread more than ``noisy`` (max/min), or other
    processes used more than ``busy`` CPUs meanwhile (a steady competitor does
    not show as spread, but an OpenMP team of 2 on 2 cores then waits for a
    time slice on every call). Keeps the least disturbed attempt; every result
    carries ``attempts``, ``spread`` and ``others_cpu``."""
    from .machine import CpuMeter
    best: Optional[dict[str, dict[str, Any]]] = None
    best_key: Optional[tuple[bool, bool, float]] = None
    best_others, n = 0.0, 0
    for attempt in range(1 + max(0, retries)):
        meter = CpuMeter()
        res = interleave(cases, repeats=repeats, target_s=target_s,
                         warmup=warmup if attempt == 0 else 0, max_inner=max_inner)
        others = meter.others() or 0.0
        n += 1
        worst = max((spread(r) for r in res.values()), default=1.0)
        disturbed = worst > noisy or others > busy
        key = (others > busy, worst > noisy, worst)
        if best is None or best_key is None or key < best_key:
            best, best_key, best_others = res, key, others
        if not disturbed or repeats < 3:
            break
    assert best is not None  # the loop runs at least once
    for r in best.values():
        r["attempts"] = n
        r["spread"] = spread(r)
        r["others_cpu"] = round(best_others, 3)
    return best
