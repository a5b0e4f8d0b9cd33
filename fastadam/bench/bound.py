"""Design: one bandwidth bound per run, and what to print when a figure is impossible.

What it decides: every "% of bound" and every speedup the suite prints goes
through these pure functions (numbers in, verdicts out; no timing), so the
logic is unit-tested on made-up timings.

Method:

* **One bound.** The bound is one figure per thread count: the best median
  of the read-modify-write probes (numpy ``a += b`` from Python threads and
  torch ``add_``; 12 bytes per element; float32 arrays far larger than the
  caches) over every time the run measured them -- at the start, and again
  interleaved with every large case. It only ever goes up during a run (a
  disturbed probe reads low, never high). The header, every table and every
  plot use this same figure (``report.finalize`` recomputes all fractions
  from it at the end).
* **Impossible means disturbed.** A case whose working set exceeds the
  last-level cache cannot move its bytes faster than memory allows: a
  fraction above 100% means the probe or the case was disturbed. The
  scenario re-measures such a case (``RETRIES`` more times at most); if it
  is still above the bound, the row is marked ``disturbed`` and neither its
  fraction nor any speedup computed from its time is printed.
* **In cache.** A case that fits in cache is not bound by memory bandwidth;
  its fraction is printed up to 100%, above that as ``in cache``.
* **Noisy.** Separately, a time whose repeats spread more than ``NOISY``
  (max/min) or during which other processes used more than ``BUSY`` CPUs is
  printed with a leading ``~``, and so is any speedup computed from it.
"""
import re

RETRIES = 2          # re-measurements of a case that reads above the bound
NOISY = 1.5          # max/min over the repeats above which a time is marked "~"
BUSY = 0.25          # CPUs used by other processes above which a time is marked "~"
DEFAULT_LLC = 32 * 2**20  # when the cache size cannot be read

OK, CACHE, DISTURBED, UNKNOWN = "ok", "in cache", "disturbed", "unknown"
METHOD = ("best median of the read-modify-write probes (numpy a += b from Python threads, "
          "torch add_; 12 B/elem) on {mib:.0f} MiB float32 arrays, over {k} measurements "
          "during the run (start of run and interleaved with large cases)")


def llc_bytes(caches):
    """The largest cache level in bytes, from ``machine.caches()`` ({"L3": "32768K"})."""
    best = 0
    for size in (caches or {}).values():
        m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(size), re.I)
        if m:
            best = max(best, int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20,
                                                "G": 2**30}[m.group(2).upper()])
    return best or DEFAULT_LLC


def verdict(gbs, bound_gbs, working_set, llc):
    """(status, pct) for a case that moved ``gbs`` GB/s with ``working_set``
    bytes live, against ``bound_gbs``.

    ``ok``: pct <= 100, print it. ``in cache``: above the memory bound but the
    working set fits in the last-level cache (``llc`` bytes), so the bound
    does not apply. ``disturbed``: above the bound with a working set larger
    than the cache -- impossible, so the measurement (probe or case) was
    disturbed. ``unknown``: no bound measured.
    """
    if not bound_gbs or gbs is None or gbs <= 0:
        return UNKNOWN, None
    pct = 100.0 * gbs / bound_gbs
    if pct <= 100.0:
        return OK, pct
    if working_set is not None and working_set > llc:
        return DISTURBED, pct
    return CACHE, pct


def impossible(gbs_by_impl, bound_gbs, working_set, llc):
    """The implementations whose figure is impossible (to re-measure)."""
    return sorted(k for k, g in gbs_by_impl.items()
                  if verdict(g, bound_gbs, working_set, llc)[0] == DISTURBED)


def noisy(rec):
    """A time disturbed by noise (spread or other processes), printed with "~"."""
    return (rec.get("spread") or 1.0) > NOISY or (rec.get("others_cpu") or 0.0) > BUSY


def fmt_pct(rec):
    """The "% of bound" cell of a record (see :func:`verdict`)."""
    st = rec.get("bound_status")
    if st == OK and rec.get("pct_bound") is not None:
        return f"{rec['pct_bound']:.0f}%"
    if st in (CACHE, DISTURBED):
        return st
    return "-"


def speedup(ours, peer):
    """peer time / our time, or None when either time is impossible (disturbed)."""
    if DISTURBED in (ours.get("bound_status"), peer.get("bound_status")):
        return None
    return peer["median_s"] / ours["median_s"]


def fmt_speedup(ours, peer, digits=2):
    """``2.31x``, ``~2.31x`` when either time was noisy, ``disturbed`` when
    either is impossible (a speedup from a disturbed probe is never printed)."""
    if peer is None:
        return "-"
    s = speedup(ours, peer)
    if s is None:
        return DISTURBED
    return ("~" if noisy(ours) or noisy(peer) else "") + f"{s:.{digits}f}x"
