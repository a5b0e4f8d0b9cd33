"""Threads, the GIL, memory, ISA modules and show_config."""
import os
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest
from conftest import importable_isas, isa_module, make_state

import fastadam as fa
from fastadam import _dispatch, _threads


def _run(code, **env):
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e)


def test_set_get_num_threads(restore_threads):
    fa.set_num_threads(3)
    cap = _threads.max_threads()           # at most one thread per usable CPU
    assert fa.get_num_threads() == min(3, cap)
    assert _threads.resolve(None, 10**7) == min(3, cap)
    assert _threads.resolve(None, 10) == 1  # small inputs run serially
    fa.set_num_threads(None)
    with pytest.raises(ValueError, match="n"):
        fa.set_num_threads(0)


def test_omp_num_threads_respected():
    r = _run("import fastadam as fa; print(fa.get_num_threads())", OMP_NUM_THREADS="1")
    assert r.stdout.strip() == "1", r.stderr
    r = _run("import fastadam as fa; print(fa.get_num_threads())", OMP_NUM_THREADS="3")
    assert r.stdout.strip() == str(min(3, _threads.max_threads())), r.stderr


def test_threadpoolctl_limits_respected():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not fa._runtime.have_openmp():
        pytest.skip("serial build")
    with threadpoolctl.threadpool_limits(limits=1, user_api="openmp"):
        assert fa.get_num_threads() == 1
    assert fa.get_num_threads() == fa._runtime.omp_max_threads()


def test_gil_released_during_step():
    """Another Python thread makes progress while a long step runs."""
    n = 2**24
    p, g, m, v, _ = make_state(n, np.float32)
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    try:
        progress = []
        for _ in range(3):
            c0 = counter[0]
            t0 = time.perf_counter()
            fa.adam_step(p, g, m, v, step=1, n_threads=1)
            dt = time.perf_counter() - t0
            progress.append((counter[0] - c0, dt))
    finally:
        stop.set()
        t.join()
    # With the GIL held, the spinner would be frozen for the whole call
    # (the switch interval is 5 ms; a step takes far longer).
    best = max(progress)
    assert best[0] > 1000, progress


def test_no_memory_growth_over_many_steps():
    ps = [np.zeros(64, np.float32), np.zeros(33, np.float32)]
    gs = [np.ones(64, np.float32), np.ones(33, np.float32)]
    opt = fa.Adam(ps)
    p, g, m, v, vm = make_state(100, np.float64)
    for _ in range(200):  # warm caches
        opt.step(gs)
        fa.adam_step(p, g, m, v, step=1, amsgrad=True, max_exp_avg_sq=vm)
        fa.grad_norm(gs)
    tracemalloc.start()
    s0 = tracemalloc.take_snapshot()
    for _ in range(10_000):
        opt.step(gs)
        fa.adam_step(p, g, m, v, step=1, amsgrad=True, max_exp_avg_sq=vm)
        fa.grad_norm(gs)
    s1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(s.size_diff for s in s1.compare_to(s0, "filename"))
    assert grown < 64 * 1024, grown
    assert opt.state_dict()["state"][0]["step"] == 10_200


# ---------------------------------------------------------------- ISA modules

def test_every_isa_module_exports_the_same_api():
    built = _dispatch.built_modules()
    assert "baseline" in built
    apis = {}
    for isa in importable_isas():
        K = isa_module(isa)
        names = sorted(n for n in dir(K) if not n.startswith("_") and callable(getattr(K, n)))
        apis[isa] = {n: (getattr(K, n).__doc__ or "").split("\n")[0] for n in names}
    first = next(iter(apis.values()))
    for isa, api in apis.items():
        assert api == first, isa
    for name in ("adam32", "adam64", "adam_multi32", "adam_multi64", "sumsq_multi32",
                 "sumsq_multi64"):
        assert name in first


def test_vector_modules_divide_by_bc2_sqrt_on_the_fma_units():
    """AVX2/AVX-512 builds have hardware fma, so ``x / bc2s`` leaves the divider;
    the x86-64 baseline (fma is a libm call there) keeps the true division."""
    import platform
    for isa in importable_isas():
        K = isa_module(isa)
        if isa in ("avx2", "avx512", "native"):
            assert K.FAST_DIV is True, isa
        elif isa == "baseline" and platform.machine() in ("x86_64", "AMD64"):
            assert K.FAST_DIV is False, isa


@pytest.mark.parametrize("isa", importable_isas())
def test_forcing_each_isa_works(isa):
    code = ("import fastadam as fa, numpy as np\n"
            "p = np.ones(40, np.float32)\n"
            "fa.adam_step(p, np.ones(40, np.float32), np.zeros(40, np.float32),"
            " np.zeros(40, np.float32), step=1, lr=0.5)\n"
            "print(fa.isa, p[0].tobytes().hex())")
    r = _run(code, FASTADAM_ISA=isa)
    assert r.returncode == 0, r.stderr
    chosen, bits = r.stdout.split()
    assert chosen == isa
    base = _run(code, FASTADAM_ISA="baseline").stdout.split()[1]
    assert bits == base


def test_forcing_unknown_or_unsupported_isa_fails_clearly(monkeypatch):
    r = _run("import fastadam", FASTADAM_ISA="sse9")
    assert r.returncode != 0 and "FASTADAM_ISA='sse9'" in r.stderr
    # any built module with CPU requirements (FASTADAM_ISAS may have left out avx2)
    needy = [i for i in _dispatch.built_modules() if _dispatch._REQUIRES[i]]
    if not needy:
        pytest.skip("only modules without CPU requirements were built")
    monkeypatch.setattr(_dispatch, "cpu_features", lambda: {"avx2": False})
    with pytest.raises(ImportError, match="not supported on this CPU: CPU lacks"):
        _dispatch.load(needy[0])


def test_default_choice_is_best_supported():
    avail = _dispatch.available_modules()
    if "FASTADAM_ISA" not in os.environ:
        assert fa.isa == avail[-1]


def test_show_config_names_module_and_threads(capsys):
    fa.show_config()
    out = capsys.readouterr().out
    assert f"_kernels_{fa.isa}" in out and "openmp" in out and "threads" in out
    assert "cpu features" in out


def test_public_imports_never_load_a_module_the_cpu_lacks():
    """Importing the public packages loads only the chosen ISA module (a module built
    for instructions the CPU lacks would die with SIGILL in its init: see
    docs/reliability.md, Limits)."""
    code = ("import sys, fastadam, fastadam.functional, fastadam.checkpoint, fastadam.bench\n"
            "import fastadam.torch\n"
            "from fastadam import _dispatch as D\n"
            "mods = sorted(m.rsplit('_', 1)[1] for m in sys.modules\n"
            "              if m.startswith('fastadam._kernels_'))\n"
            "print(fastadam.isa, ','.join(mods), ','.join(D.available_modules()))")
    env = {k: v for k, v in os.environ.items() if k != "FASTADAM_ISA"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    chosen, loaded, avail = r.stdout.split()
    assert loaded.split(",") == [chosen] and chosen in avail.split(","), r.stdout


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_view_at_is_a_read_only_view_that_keeps_its_owner(dtype, shape):
    """``_runtime.view_at``: the torch layer's per-step grad view (address, like, owner)."""
    import gc
    import weakref

    from fastadam import _runtime

    class Owner:
        def __init__(self, a):
            self.a = a

    src = np.arange(np.prod(shape), dtype=dtype).reshape(shape) + 1
    owner = Owner(src)
    ref = weakref.ref(owner)
    like = np.zeros(shape, dtype)
    v = _runtime.view_at(src.ctypes.data, like, owner)
    assert v.dtype == dtype and v.shape == shape and not v.flags.writeable
    np.testing.assert_array_equal(v, src)
    del owner, src
    gc.collect()
    assert ref() is not None          # the view holds its owner (and so the memory)
    assert v.base is ref()
    np.testing.assert_array_equal(v, np.arange(np.prod(shape), dtype=dtype).reshape(shape) + 1)
    del v
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="like"):
        _runtime.view_at(like.ctypes.data, np.zeros((4, 4)).T, None)
    with pytest.raises(ValueError, match="address"):
        _runtime.view_at(0, like, None)


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_view_at_rows_replaces_the_first_dimension(rows):
    """``rows``: the sparse gradient's per-step views (ids, value rows), whose count
    changes each step, from one template of the trailing shape."""
    from fastadam import _runtime

    src = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2).copy()
    v = _runtime.view_at(src.ctypes.data, np.zeros((0, 3, 2), np.float32), src, rows)
    assert v.shape == (rows, 3, 2) and not v.flags.writeable and v.base is src
    np.testing.assert_array_equal(v, src[:rows])
    ids = np.array([4, 0, 7, 7, 2], np.int64)
    iv = _runtime.view_at(ids.ctypes.data, np.empty(0, np.int64), ids, rows)
    np.testing.assert_array_equal(iv, ids[:rows])
    with pytest.raises(ValueError, match="rows"):
        _runtime.view_at(src.ctypes.data, np.zeros((), np.float32), src, 2)


def test_step_counter_helpers_check_their_arrays():
    """``common_step`` / ``set_steps`` take raw addresses: wrong arrays raise, never read."""
    from fastadam import _runtime

    steps = np.array([3.0, 3.0], np.float32)
    s64 = np.array([7.0])
    ptrs = np.array([steps.ctypes.data, steps.ctypes.data + 4, s64.ctypes.data], np.int64)
    is64 = np.array([0, 0, 1], np.int8)
    assert _runtime.common_step(ptrs, is64) == -1.0
    _runtime.set_steps(ptrs, is64, 4.0)
    assert steps.tolist() == [4.0, 4.0] and s64.tolist() == [4.0]
    assert _runtime.common_step(ptrs, is64) == 4.0
    for bad_ptrs, bad_is64, name in [(ptrs.astype(np.int32), is64, "ptrs"),
                                     (ptrs[::2], is64[:2], "ptrs"),
                                     (ptrs, is64.astype(bool), "is64")]:
        with pytest.raises(TypeError, match=name):
            _runtime.common_step(bad_ptrs, bad_is64)
        with pytest.raises(TypeError, match=name):
            _runtime.set_steps(bad_ptrs, bad_is64, 9.0)
    with pytest.raises(ValueError, match="length"):
        _runtime.common_step(ptrs, is64[:2])
    assert steps.tolist() == [4.0, 4.0] and s64.tolist() == [4.0]
