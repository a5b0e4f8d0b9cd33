"""Thread-count resolution for the kernels.

``n_threads=None`` resolves at CALL time: ``set_num_threads(n)`` if the user
called it, else the OpenMP runtime's ``omp_get_max_threads()`` (which follows
``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits``). Inputs smaller
than ``SERIAL_THRESHOLD`` elements run on one thread: waking the OpenMP team
costs more than it saves there (threshold measured with ``python -m fastadam.bench
--scenario threshold``).
"""
import operator
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


def check(n_threads: Optional[int], name: str = "n_threads") -> Optional[int]:
    """Validate a thread count: an int >= 1, or None (resolve at call time)."""
    if n_threads is None or type(n_threads) is int and n_threads >= 1:
        return n_threads
    try:
        n = operator.index(n_threads)
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got "
                        f"{type(n_threads).__name__}") from None
    if n < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {n}")
    return n


def set_num_threads(n: Optional[int]) -> None:
    """Set the default thread count for all fastadam calls (None: reset to OpenMP's)."""
    global _user_threads
    _user_threads = check(n, "set_num_threads: n")


def get_num_threads() -> int:
    """Threads a call with ``n_threads=None`` uses (for inputs above the serial threshold)."""
    if _user_threads is not None:
        return _user_threads
    return _runtime.omp_max_threads()


def resolve(n_threads: Optional[int], work: int, threshold: int = SERIAL_THRESHOLD) -> int:
    """Threads for one call over ``work`` elements.

    Each thread gets at least ``threshold`` elements, so small inputs run
    serially even when many threads are asked for (results do not depend on
    the thread count, only the speed does).
    """
    if n_threads is None:
        if work < 2 * threshold:
            return 1
        n = _user_threads if _user_threads is not None else _runtime.omp_max_threads()
    else:
        n = check(n_threads) or 1      # never None here: n_threads is not None
    cap = work // threshold
    return n if n <= cap else (cap if cap > 1 else 1)
