# cython: language_level=3
"""Design: flag-free runtime helpers (layer 1, support).

Compiled WITHOUT any instruction-set flag, so it is safe to import on every
x86-64 CPU before a kernel module is chosen. Contract:

* ``cpu_features()`` -- CPU and OS support for the ISA levels, via the
  compiler's ``__builtin_cpu_supports`` (which checks XGETBV for OS support of
  the YMM/ZMM state).
* ``omp_max_threads()`` / ``have_openmp()`` -- the OpenMP runtime this package
  links (respects ``OMP_NUM_THREADS`` and ``threadpoolctl``).
* ``addresses(arrays, out)`` -- data pointers of a list of ndarrays, written to
  an int64 buffer, for the multi-array kernels.
* ``first_overlap(arrays)`` -- index pair of the first two arrays whose memory
  ranges overlap, or None (exact for contiguous arrays).
"""
cimport numpy as cnp
from libc.stdint cimport int64_t, intptr_t

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fa_omp_max_threads(void) { return omp_get_max_threads(); }
    static int fa_have_openmp(void) { return 1; }
    #else
    static int fa_omp_max_threads(void) { return 1; }
    static int fa_have_openmp(void) { return 0; }
    #endif
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    static int fa_is_x86(void) { return 1; }
    static int fa_cpu(int which) {
        __builtin_cpu_init();
        switch (which) {
        case 0: return __builtin_cpu_supports("avx2");
        case 1: return __builtin_cpu_supports("fma");
        case 2: return __builtin_cpu_supports("avx512f");
        case 3: return __builtin_cpu_supports("avx512dq");
        case 4: return __builtin_cpu_supports("avx512bw");
        case 5: return __builtin_cpu_supports("avx512vl");
        case 6: return __builtin_cpu_supports("avx");
        }
        return 0;
    }
    #else
    static int fa_is_x86(void) { return 0; }
    static int fa_cpu(int which) { (void)which; return 0; }
    #endif
    """
    int fa_omp_max_threads() nogil
    int fa_have_openmp() nogil
    int fa_is_x86() nogil
    int fa_cpu(int which) nogil

_FEATURES = ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx")


def cpu_features():
    """Dict of feature name -> bool, as seen by the CPU and OS (x86 only)."""
    if not fa_is_x86():
        return {}
    return {name: bool(fa_cpu(i)) for i, name in enumerate(_FEATURES)}


def is_x86():
    return bool(fa_is_x86())


def omp_max_threads():
    return fa_omp_max_threads()


def have_openmp():
    return bool(fa_have_openmp())


def addresses(list arrays, int64_t[::1] out):
    """Write the data pointer of each ndarray in ``arrays`` into ``out``."""
    cdef Py_ssize_t i
    for i in range(len(arrays)):
        out[i] = <int64_t><intptr_t>cnp.PyArray_DATA(<cnp.ndarray>arrays[i])


def first_overlap(tuple arrays):
    """Return (i, j) for the first pair of overlapping arrays, or None.

    ``None`` entries are skipped. Exact for contiguous arrays: it compares
    the byte ranges [data, data + nbytes). Empty arrays never overlap.
    """
    cdef Py_ssize_t n = len(arrays), i, j
    cdef intptr_t lo_i, hi_i, lo_j, hi_j
    cdef cnp.ndarray a, b
    for i in range(n):
        if arrays[i] is None:
            continue
        a = <cnp.ndarray>arrays[i]
        lo_i = <intptr_t>cnp.PyArray_DATA(a)
        hi_i = lo_i + cnp.PyArray_NBYTES(a)
        if hi_i == lo_i:
            continue
        for j in range(i + 1, n):
            if arrays[j] is None:
                continue
            b = <cnp.ndarray>arrays[j]
            lo_j = <intptr_t>cnp.PyArray_DATA(b)
            hi_j = lo_j + cnp.PyArray_NBYTES(b)
            if hi_j != lo_j and lo_i < hi_j and lo_j < hi_i:
                return (i, j)
    return None
