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
* ``probe_threads(n, stacksize)`` -- how many of ``n`` threads the OS lets this
  process start now (each started, then joined), so that the OpenMP runtime is
  never asked for a team it cannot create: GNU libgomp exits the process when
  thread creation fails (``fastadam._threads``).
* ``common_step`` / ``set_steps`` -- read and write the 0-d step counters of
  many torch state tensors by address; ``first_hit`` -- the first of many
  byte ranges that overlaps a sorted set of output ranges (the torch layer's
  per-step checks, one call per param group); ``view_at`` -- a read-only
  ndarray over a checked tensor's memory, cheaper than ``Tensor.numpy()``.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t, intptr_t, INT64_MIN
from libc.stdlib cimport malloc, free

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
    #if defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
    #include <pthread.h>
    #include <stdlib.h>
    static void* fa_probe_body(void* arg) { return arg; }
    static int fa_probe_threads(int n, size_t stacksize) {
        pthread_attr_t attr;
        pthread_t* ids;
        int made = 0, i;
        if (n <= 0) return 0;
        ids = (pthread_t*)malloc((size_t)n * sizeof(pthread_t));
        if (ids == NULL || pthread_attr_init(&attr) != 0) { free(ids); return 0; }
        if (stacksize) pthread_attr_setstacksize(&attr, stacksize);
        while (made < n && pthread_create(&ids[made], &attr, fa_probe_body, NULL) == 0) made++;
        for (i = 0; i < made; i++) pthread_join(ids[i], NULL);
        pthread_attr_destroy(&attr);
        free(ids);
        return made;
    }
    #else
    static int fa_probe_threads(int n, size_t stacksize) { (void)stacksize; return n; }
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
        case 7: return __builtin_cpu_supports("f16c");
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
    int fa_probe_threads(int n, size_t stacksize) nogil
    int fa_is_x86() nogil
    int fa_cpu(int which) nogil

_FEATURES = ("avx2", "fma", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx", "f16c")


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


def probe_threads(int n, size_t stacksize=0):
    """Start ``n`` threads (stack ``stacksize`` bytes, 0: the default), join them,
    return how many could be started (``n`` where OpenMP or pthreads are absent)."""
    cdef int made
    with nogil:
        made = fa_probe_threads(n, stacksize)
    return made


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


cdef inline bint _ok_float(cnp.ndarray a, int typenum, bint writable) noexcept:
    if cnp.PyArray_TYPE(a) != typenum:
        return False
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return False
    if not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISALIGNED(a):
        return False
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        return False
    return True


cdef inline bint _same_shape(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int d, nd = cnp.PyArray_NDIM(a)
    if nd != cnp.PyArray_NDIM(b):
        return False
    for d in range(nd):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


# The dtypes (numpy type numbers) the native scans accept, in code order
# (``set_scan_types``; float32 and float64 until then).
cdef int _scan_nums[8]
cdef int _scan_n = 2
_scan_nums[0] = cnp.NPY_FLOAT32
_scan_nums[1] = cnp.NPY_FLOAT64


def set_scan_types(tuple typenums):
    """Set the dtypes the native scans accept: numpy type numbers (at most
    8), whose positions are the indices in the scans' codes. Called once by
    ``fastadam._validate`` with the kernel dtypes numpy can name (float32,
    float64, bfloat16 where ml_dtypes is installed, float16)."""
    global _scan_n
    cdef Py_ssize_t i, n = len(typenums)
    if not 1 <= n <= 8:
        raise ValueError(f"set_scan_types: 1 to 8 type numbers, got {n}")
    for i in range(n):
        _scan_nums[i] = <int>typenums[i]
    _scan_n = <int>n


cdef inline int _scan_index(int typenum) noexcept:
    cdef int i
    for i in range(_scan_n):
        if _scan_nums[i] == typenum:
            return i
    return -1


def dense_scan(object param, object grad, object exp_avg, object exp_avg_sq,
               object max_exp_avg_sq):
    """Fast path of the single-buffer validation (``functional._plan_single``):
    when every buffer is fine, the code ``ip + 8 * ig + 64 * iss`` of the
    param's, grad's and state's dtypes (their indices among the scan types,
    ``set_scan_types``: 0 for all-float32), else -1 and the caller explains
    the problem with the Python checks. Whether a kernel exists for the
    combination is the caller's lookup (no kernel: the Python checks too).

    Fine: ndarrays of scan-type dtypes in native byte order, one shape,
    C-contiguous and aligned, all but ``grad`` writable, ``exp_avg_sq`` and
    ``max_exp_avg_sq`` (None or an array) of ``exp_avg``'s dtype, and no two
    of them sharing memory.
    """
    cdef cnp.ndarray p, g, m, v, vm
    cdef int tp, tg, ts, ip, ig, iss
    if not (cnp.PyArray_Check(param) and cnp.PyArray_Check(grad)
            and cnp.PyArray_Check(exp_avg) and cnp.PyArray_Check(exp_avg_sq)):
        return -1
    p, g, m, v = <cnp.ndarray>param, <cnp.ndarray>grad, <cnp.ndarray>exp_avg, \
        <cnp.ndarray>exp_avg_sq
    tp, tg, ts = cnp.PyArray_TYPE(p), cnp.PyArray_TYPE(g), cnp.PyArray_TYPE(m)
    ip, ig, iss = _scan_index(tp), _scan_index(tg), _scan_index(ts)
    if ip < 0 or ig < 0 or iss < 0:
        return -1
    if not (_ok_float(p, tp, True) and _ok_float(g, tg, False)
            and _ok_float(m, ts, True) and _ok_float(v, ts, True)
            and _same_shape(g, p) and _same_shape(m, p) and _same_shape(v, p)):
        return -1
    if max_exp_avg_sq is not None:
        if not cnp.PyArray_Check(max_exp_avg_sq):
            return -1
        vm = <cnp.ndarray>max_exp_avg_sq
        if not (_ok_float(vm, ts, True) and _same_shape(vm, p)):
            return -1
    if first_overlap((p, m, v, max_exp_avg_sq, g)) is not None:
        return -1
    return ip + 8 * ig + 64 * iss


def sparse_scan(object table, object indices, object grad_rows, object exp_avg,
                object exp_avg_sq):
    """Fast path of ``sparse_adam_step``'s validation (elementwise second
    moment): 0 (float32) or 1 (float64) when every buffer is fine, else -1 and
    the caller explains the problem with the Python checks.

    Fine: ndarrays; ``table`` native float32/float64, 2-D, C-contiguous and
    writable and aligned (as every buffer here); ``exp_avg``/``exp_avg_sq`` the same and of its shape;
    ``grad_rows`` (len(indices), dim) of its dtype, C-contiguous; ``indices``
    native int32/int64, 1-D, C-contiguous; no two of them share memory.
    """
    cdef cnp.ndarray t, ix, g, m, v
    cdef int typenum, it
    if not (cnp.PyArray_Check(table) and cnp.PyArray_Check(indices)
            and cnp.PyArray_Check(grad_rows) and cnp.PyArray_Check(exp_avg)
            and cnp.PyArray_Check(exp_avg_sq)):
        return -1
    t, ix, g = <cnp.ndarray>table, <cnp.ndarray>indices, <cnp.ndarray>grad_rows
    m, v = <cnp.ndarray>exp_avg, <cnp.ndarray>exp_avg_sq
    typenum = cnp.PyArray_TYPE(t)
    if (typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64) or cnp.PyArray_NDIM(t) != 2:
        return -1
    if not (_ok_float(t, typenum, True) and _ok_float(m, typenum, True)
            and _ok_float(v, typenum, True) and _ok_float(g, typenum, False)
            and _same_shape(m, t) and _same_shape(v, t)):
        return -1
    it = cnp.PyArray_TYPE(ix)
    if ((it != cnp.NPY_INT32 and it != cnp.NPY_INT64) or cnp.PyArray_NDIM(ix) != 1
            or not cnp.PyArray_ISNOTSWAPPED(ix) or not cnp.PyArray_IS_C_CONTIGUOUS(ix)
            or not cnp.PyArray_ISALIGNED(ix)):
        return -1
    if (cnp.PyArray_NDIM(g) != 2 or cnp.PyArray_DIM(g, 0) != cnp.PyArray_DIM(ix, 0)
            or cnp.PyArray_DIM(g, 1) != cnp.PyArray_DIM(t, 1)):
        return -1
    if first_overlap((t, m, v, g, ix)) is not None:
        return -1
    return 1 if typenum == cnp.NPY_FLOAT64 else 0


def scan_lists(list params, list grads, list exp_avgs, list exp_avg_sqs, object vmaxs,
               int64_t[:, ::1] ptrs, int64_t[::1] sizes, signed char[::1] key_of):
    """Fast path of the multi-array validation: returns -1 when every entry is
    fine (and fills ``ptrs[j, i]`` with the data pointers of list j, ``sizes``
    and ``key_of``: the index of the entry's dtype among the scan types,
    ``set_scan_types``), else the index of the first entry that is not; the
    caller then explains that entry with the Python checks
    (``fastadam._validate``).

    An entry is fine when all its buffers are ndarrays of the param's dtype
    (a scan type, native byte order), aligned, C-contiguous, of the param's
    shape, and all but the grad writable.
    """
    cdef Py_ssize_t i, j, n = len(params)
    cdef list lists = [params, grads, exp_avgs, exp_avg_sqs]
    cdef object o
    cdef cnp.ndarray p, a
    cdef int typenum, code, nl = 4
    if vmaxs is not None:
        lists.append(vmaxs)
        nl = 5
    for i in range(n):
        o = params[i]
        if not cnp.PyArray_Check(o):
            return i
        p = <cnp.ndarray>o
        typenum = cnp.PyArray_TYPE(p)
        code = _scan_index(typenum)
        if code < 0:
            return i
        for j in range(nl):
            o = (<list>lists[j])[i]
            if not cnp.PyArray_Check(o):
                return i
            a = <cnp.ndarray>o
            if not _ok_float(a, typenum, j != 1) or not _same_shape(a, p):
                return i
            ptrs[j, i] = <int64_t><intptr_t>cnp.PyArray_DATA(a)
        sizes[i] = cnp.PyArray_SIZE(p)
        key_of[i] = <signed char>code
    return -1


cdef extern from "stdlib.h":
    void qsort(void* base, size_t nmemb, size_t size,
               int (*compar)(const void*, const void*) noexcept nogil) nogil

ctypedef struct _span:
    int64_t lo
    int64_t hi
    int64_t idx
    int64_t out

cdef int _cmp_span(const void* a, const void* b) noexcept nogil:
    cdef int64_t x = (<const _span*>a).lo, y = (<const _span*>b).lo
    cdef int64_t i = (<const _span*>a).idx, k = (<const _span*>b).idx
    if x != y:
        return -1 if x < y else 1
    return -1 if i < k else (1 if i > k else 0)


def first_conflict(const int64_t[::1] lo, const int64_t[::1] nbytes, const signed char[::1] out):
    """Byte ranges [lo, lo + nbytes): return (i, j) for an output range that
    overlaps any other range (inputs may overlap inputs), or None.

    Sort by start, then compare each range with the running maximum end of the
    ranges before it (of all ranges for an output, of outputs for an input).
    """
    cdef Py_ssize_t n = lo.shape[0], k = 0, i, b
    cdef _span* s = <_span*>malloc(max(n, 1) * sizeof(_span))
    cdef int64_t max_all = INT64_MIN, max_out = INT64_MIN
    cdef Py_ssize_t arg_all = -1, arg_out = -1
    if s == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            if nbytes[i] > 0:
                s[k].lo = lo[i]
                s[k].hi = lo[i] + nbytes[i]
                s[k].idx = i
                s[k].out = out[i]
                k += 1
        qsort(s, k, sizeof(_span), _cmp_span)
        for b in range(k):
            if s[b].out:
                if s[b].lo < max_all:
                    return tuple(sorted((s[arg_all].idx, s[b].idx)))
            elif s[b].lo < max_out:
                return tuple(sorted((s[arg_out].idx, s[b].idx)))
            if s[b].hi > max_all:
                max_all = s[b].hi
                arg_all = b
            if s[b].out and s[b].hi > max_out:
                max_out = s[b].hi
                arg_out = b
        return None
    finally:
        free(s)


# ------------------------------------------------- torch layer: scalar steps, grad ranges

cdef inline Py_ssize_t _counters(cnp.ndarray ptrs, cnp.ndarray is64) except -1:
    """The number of step counters: ``ptrs`` C-contiguous int64 and ``is64`` int8
    of its length, else TypeError / ValueError (the raw-address helpers below take
    ndarrays, not memoryviews: a memoryview argument costs ~0.4 us a call)."""
    for a, typenum, name in ((ptrs, cnp.NPY_INT64, "ptrs"), (is64, cnp.NPY_INT8, "is64")):
        if cnp.PyArray_TYPE(a) != typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a):
            raise TypeError(f"{name} must be a C-contiguous "
                            f"{cnp.PyArray_DescrFromType(typenum)} array")
    if cnp.PyArray_SIZE(is64) != cnp.PyArray_SIZE(ptrs):
        raise ValueError("ptrs and is64 differ in length")
    return cnp.PyArray_SIZE(ptrs)


def common_step(cnp.ndarray ptrs, cnp.ndarray is64):
    """The value of the 0-d step counters at ``ptrs`` (int64 addresses of a
    float32, or float64 where ``is64[i]`` (int8), counter) when they all hold
    the same one, else -1.0 (0 counters: -1.0). The addresses are the live
    ``data_ptr()`` of the state tensors, checked by the caller in the same step."""
    cdef Py_ssize_t i, n = _counters(ptrs, is64)
    cdef const int64_t* pp = <const int64_t*>cnp.PyArray_DATA(ptrs)
    cdef const signed char* w = <const signed char*>cnp.PyArray_DATA(is64)
    cdef double v, first = -1.0
    for i in range(n):
        if w[i]:
            v = (<const double*><intptr_t>pp[i])[0]
        else:
            v = (<const float*><intptr_t>pp[i])[0]
        if i == 0:
            first = v
        elif v != first:
            return -1.0
    return first


def set_steps(cnp.ndarray ptrs, cnp.ndarray is64, double value):
    """Write ``value`` into every 0-d step counter at ``ptrs`` (as
    :func:`common_step` reads them), rounded once to each counter's dtype."""
    cdef Py_ssize_t i, n = _counters(ptrs, is64)
    cdef const int64_t* pp = <const int64_t*>cnp.PyArray_DATA(ptrs)
    cdef const signed char* w = <const signed char*>cnp.PyArray_DATA(is64)
    for i in range(n):
        if w[i]:
            (<double*><intptr_t>pp[i])[0] = value
        else:
            (<float*><intptr_t>pp[i])[0] = <float>value


cdef extern from *:
    """
    static PyObject *fa_view_at(PyArrayObject *like, void *data, npy_intp rows) {
        PyArray_Descr *d = PyArray_DESCR(like);
        npy_intp dims[NPY_MAXDIMS];
        int i, nd = PyArray_NDIM(like);
        for (i = 0; i < nd; i++) dims[i] = PyArray_DIMS(like)[i];
        if (rows >= 0) dims[0] = rows;
        Py_INCREF(d);  /* PyArray_NewFromDescr steals it */
        return PyArray_NewFromDescr(&PyArray_Type, d, nd, dims,
                                    NULL, data, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED,
                                    NULL);
    }
    """
    object fa_view_at(cnp.ndarray like, void* data, cnp.npy_intp rows)


def view_at(int64_t address, cnp.ndarray like, object owner, Py_ssize_t rows=-1):
    """A read-only ndarray of ``like``'s dtype and shape (C order) over the
    memory at ``address``, holding a reference to ``owner`` (the object whose
    memory it is: a torch tensor). ~0.2 us, against ~2 us for
    ``tensor.numpy()``; the torch layer's per-step view of a gradient whose
    address, dtype, shape and layout it has just checked. ``rows >= 0``
    replaces the first dimension (``like`` at least 1-d): the sparse
    gradient's ids and value rows, whose count changes every step."""
    if not cnp.PyArray_IS_C_CONTIGUOUS(like):
        raise ValueError("like must be C-contiguous")
    if address == 0:
        raise ValueError("address is null")
    if rows >= 0 and cnp.PyArray_NDIM(like) == 0:
        raise ValueError("rows needs a like with at least one dimension")
    cdef cnp.ndarray out = fa_view_at(like, <void*><intptr_t>address, rows)
    cnp.Py_INCREF(owner)  # PyArray_SetBaseObject steals it
    cnp.PyArray_SetBaseObject(out, owner)
    return out


def first_hit(const int64_t[::1] out_lo, const int64_t[::1] out_hi_max,
              const int64_t[::1] lo, const int64_t[::1] nbytes):
    """The index of the first range [lo[i], lo[i] + nbytes[i]) that overlaps one
    of the output ranges, else -1. The outputs come sorted by start
    (``out_lo``) with ``out_hi_max[k]`` the largest end among the first k + 1
    of them; empty ranges never overlap. A binary search per range."""
    cdef Py_ssize_t i, n = lo.shape[0], m = out_lo.shape[0], a, b, c
    cdef int64_t s, e
    for i in range(n):
        s = lo[i]
        e = s + nbytes[i]
        if e == s:
            continue
        a, b = 0, m          # find the number of outputs that start before e
        while a < b:
            c = (a + b) // 2
            if out_lo[c] < e:
                a = c + 1
            else:
                b = c
        if a > 0 and out_hi_max[a - 1] > s:
            return i
    return -1
