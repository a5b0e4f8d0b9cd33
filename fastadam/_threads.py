"""Thread-count resolution for the kernels.

``n_threads=None`` resolves at CALL time: ``set_num_threads(n)`` if the user
called it, else the OpenMP runtime's ``omp_get_max_threads()`` (which follows
``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits``). Inputs smaller
than ``SERIAL_THRESHOLD`` elements run on one thread: waking the OpenMP team
costs more than it saves there (threshold measured with ``python -m fastadam.bench
--scenario threshold``).

Bounds (results never depend on the thread count, only the speed does, so
these clamp rather than reject):

* **At most one thread per usable CPU**: every count -- explicit
  ``n_threads``, ``set_num_threads`` and the OpenMP default -- is clamped to
  :func:`max_threads`, the CPUs in the process's affinity mask
  (``os.sched_getaffinity``, read at call time; ``os.cpu_count()`` where the
  platform has no affinity mask). More threads than CPUs never speed up these
  memory/compute-bound loops, and an unbounded count lets a typo start
  thousands of OS threads (or make libgomp exit the process when thread
  creation fails).
* **Never a team the OS refuses**: GNU libgomp exits the process (rc 1, no
  Python exception, no ``finally``) when it cannot create a thread of a team
  (``RLIMIT_NPROC``, ``RLIMIT_AS``, cgroup ``pids.max``, memory). Before a
  Python thread first asks for a team larger than any it used before, the
  threads it would add are started and joined once here
  (``_runtime.probe_threads``, with libgomp's stack size from
  ``OMP_STACKSIZE``/``GOMP_STACKSIZE``); if the OS refuses some, the call runs
  on the threads it could start, with a ``RuntimeWarning``, and the next
  larger request probes again. Cost: one thread start per added thread, once
  per Python thread (libgomp keeps one pool per thread that starts teams).
  A limit that tightens between the probe and the team is not caught.
* **Serial after fork**: GNU OpenMP's thread pool does not survive
  ``fork()`` -- a child whose parent had started a team hangs in its first
  parallel region. A child created by ``os.fork`` (``multiprocessing``'s
  'fork' start method included) therefore runs every kernel on one thread
  (:func:`forked` is True there). Use the 'spawn' or 'forkserver' start
  methods for threaded steps in worker processes.
"""
import operator
import os
import re
import threading
import warnings
from typing import Optional

from . import _runtime

# Each thread gets at least this many elements (float32 Adam). Measured on
# the dev machine (2 cores, AVX-512 module; `python -m fastadam.bench --scenario
# threshold`, idle machine, 2026-11-21, after the division by sqrt(bc2) left
# the divider): two threads win from 8,192 float32 elements and from ~2,048
# float64 elements (in two runs; fp64 costs ~3-4x more per element here,
# divider-bound). So 2 threads start at 2 * 4096 float32 elements; float64
# work is weighted by FP64_COST before the comparison.
SERIAL_THRESHOLD = 4096
FP64_COST = 4
# Sparse kernels: below this many touched elements (rows * dim), one thread.
SPARSE_SERIAL_THRESHOLD = 16384

_user_threads: Optional[int] = None
_forked = False
# Per Python thread: the largest team proven startable (libgomp keeps a pool per
# thread that starts teams, so each proves its own).
_proven = threading.local()


def _after_fork_in_child() -> None:
    global _forked, _proven
    _forked = True
    _proven = threading.local()


def _stacksize() -> int:
    """libgomp's worker stack size in bytes from OMP_STACKSIZE/GOMP_STACKSIZE
    (a number with an optional B/K/M/G suffix, K by default), else 0: the default."""
    for var in ("OMP_STACKSIZE", "GOMP_STACKSIZE"):
        m = re.fullmatch(r"\s*(\d+)\s*([bBkKmMgG]?)\s*", os.environ.get(var, ""))
        if m:
            unit = {"b": 1, "": 1024, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
            return int(m.group(1)) * unit
    return 0


def startable(n: int) -> int:
    """``n``, or fewer if the OS cannot start the threads a team of ``n`` adds
    to the calling thread's pool (see the module docstring)."""
    have = getattr(_proven, "n", 1)
    if n <= have:
        return n
    made = _runtime.probe_threads(n - have, _stacksize())
    if made >= n - have:
        _proven.n = n
        return n
    warnings.warn(f"fastadam: the OS let this process start only {made} of the {n - have} "
                  f"more threads a {n}-thread step needs; running on {have + made} "
                  "(results do not depend on the thread count)", RuntimeWarning, stacklevel=3)
    return have + made


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def forked() -> bool:
    """True in a process created by ``fork()`` from one that imported fastadam:
    every kernel runs serially there (GNU OpenMP's pool does not survive fork)."""
    return _forked


def max_threads() -> int:
    """The most threads any call uses: the CPUs this process may run on
    (its affinity mask), 1 in a forked child."""
    if _forked:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - no affinity API
        return max(1, os.cpu_count() or 1)


def check(n_threads: Optional[int], name: str = "n_threads") -> Optional[int]:
    """Validate a thread count: an int >= 1 (bools rejected), or None (resolve
    at call time). Counts above :func:`max_threads` are accepted and clamped
    when a call runs."""
    if n_threads is None or type(n_threads) is int and n_threads >= 1:
        return n_threads
    if isinstance(n_threads, bool):
        raise TypeError(f"{name} must be an int or None, got bool")
    try:
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got "
                        f"{type(n_threads).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {n}")
    return n


def set_num_threads(n: Optional[int]) -> None:
    """Set the default thread count for all fastadam calls (None: reset to OpenMP's).

    Counts above the usable CPUs (:func:`max_threads`) are clamped when a
    call runs."""
    global _user_threads
    _user_threads = check(n, "set_num_threads: n")


def get_num_threads() -> int:
    """Threads a call with ``n_threads=None`` uses (for inputs above the serial
    threshold): ``set_num_threads``'s value, else OpenMP's default (which
    follows ``OMP_NUM_THREADS``), at most :func:`max_threads`."""
    n = _user_threads if _user_threads is not None else _runtime.omp_max_threads()
    cap = max_threads()
    return n if n <= cap else cap


def resolve(n_threads: Optional[int], work: int, threshold: int = SERIAL_THRESHOLD) -> int:
    """Threads for one call over ``work`` elements.

    Each thread gets at least ``threshold`` elements, so small inputs run
    serially even when many threads are asked for (results do not depend on
    the thread count, only the speed does). Never more than :func:`max_threads`.
    """
    if n_threads is None:
        if work < 2 * threshold:
            return 1
        n = _user_threads if _user_threads is not None else _runtime.omp_max_threads()
    else:
        n = check(n_threads) or 1      # never None here: n_threads is not None
    cap = work // threshold
    n = n if n <= cap else (cap if cap > 1 else 1)
    if n > 1:
        hw = max_threads()
        if n > hw:
            n = hw
        if n > getattr(_proven, "n", 1):
            n = startable(n)
    return n
