"""Reliability: fork safety, thread bounds, concurrency (docs/reliability.md)."""
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_py(code, timeout=120, env=None, preexec_fn=None):
    """Run ``code`` in a fresh interpreter; its stdout, or fail (never hang)."""
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(env or {})
    try:
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                           text=True, timeout=timeout, env=e, preexec_fn=preexec_fn)
    except subprocess.TimeoutExpired as exc:  # pragma: no cover - the bug
        pytest.fail(f"subprocess hung (killed after {timeout} s): {exc.stdout} {exc.stderr}")
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


# ------------------------------------------------------------------ fork

@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_steps_serially_and_does_not_hang():
    """The parent ran a threaded step (started the OpenMP pool); a 'fork'
    child then steps with n_threads=2: it must finish, with the same result."""
    out = _run_py("""
        import hashlib, multiprocessing as mp, sys
        import numpy as np, fastadam as fa

        def state():
            rng = np.random.default_rng(0)
            p = rng.standard_normal(1 << 20).astype(np.float32)
            g = rng.standard_normal(1 << 20).astype(np.float32)
            return p, g, np.zeros_like(p), np.zeros_like(p)

        def child(q):
            p, g, m, v = state()
            fa.adam_step(p, g, m, v, step=1, n_threads=2)
            fa.functional.adam([p, p.copy()], [g, g], [m, m.copy()], [v, v.copy()],
                               steps=2, n_threads=2)
            t = np.zeros((1000, 64), np.float32)
            ids = np.arange(1000).repeat(2)
            gr = np.ones((2000, 64), np.float32)
            fa.sparse_adam_step(t, ids, gr, np.zeros_like(t), np.zeros_like(t), step=1,
                                n_threads=2)
            fa.grad_norm(g, n_threads=2)
            digest = hashlib.sha256(p.tobytes()).hexdigest()
            q.put((digest, fa.get_num_threads(), fa._threads.forked()))

        if __name__ == "__main__":
            p, g, m, v = state()
            fa.adam_step(p, g, m, v, step=1, n_threads=2)       # the pool is started
            fa.functional.adam([p, p.copy()], [g, g], [m, m.copy()], [v, v.copy()],
                               steps=2, n_threads=1)
            ctx = mp.get_context("fork")
            q = ctx.Queue()
            c = ctx.Process(target=child, args=(q,))
            c.start()
            c.join(30)
            if c.is_alive():
                c.kill()
                c.join()
                print("HUNG")
                sys.exit(3)
            got, nt, forked = q.get(timeout=5)
            assert c.exitcode == 0, c.exitcode
            assert got == hashlib.sha256(p.tobytes()).hexdigest()
            assert nt == 1 and forked
            assert not fa._threads.forked()
            print("OK")
    """)
    assert "OK" in out


# --------------------------------------------------------------- threads

def test_thread_count_is_capped_at_the_usable_cpus(restore_threads):
    import fastadam as fa
    from fastadam import _threads
    cap = _threads.max_threads()
    assert cap == len(os.sched_getaffinity(0))
    fa.set_num_threads(10**9)
    assert fa.get_num_threads() == cap
    assert _threads.resolve(None, 1 << 30) == cap
    assert _threads.resolve(10**9, 1 << 30) == cap
    assert _threads.resolve(10**30, 1 << 30) == cap      # beyond a C int: clamped first
    fa.set_num_threads(None)
    with pytest.raises(TypeError, match="n_threads"):
        _threads.check(True)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity API")
def test_default_threads_follow_affinity_and_omp_num_threads():
    """A process pinned to one CPU runs one thread, whatever OMP_NUM_THREADS
    or set_num_threads say; a huge explicit count starts no extra OS threads."""
    cpu = min(os.sched_getaffinity(0))
    out = _run_py("""
        import os
        import numpy as np, fastadam as fa
        before = len(os.listdir("/proc/self/task"))
        a = fa.get_num_threads()
        fa.set_num_threads(10**9)
        b = fa.get_num_threads()
        p = np.zeros(1 << 22, np.float32)
        fa.adam_step(p, p.copy(), np.zeros_like(p), np.zeros_like(p), step=1, n_threads=10**9)
        print(a, b, len(os.listdir("/proc/self/task")) - before)
    """, env={"OMP_NUM_THREADS": "4"}, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert out.split() == ["1", "1", "0"]
    n = len(os.sched_getaffinity(0))
    out = _run_py("""
        import os
        import numpy as np, fastadam as fa
        before = len(os.listdir("/proc/self/task"))
        p = np.zeros(1 << 22, np.float32)
        fa.adam_step(p, p.copy(), np.zeros_like(p), np.zeros_like(p), step=1, n_threads=10**9)
        print(fa.get_num_threads(), len(os.listdir("/proc/self/task")) - before)
    """)
    nt, extra = map(int, out.split())
    assert nt <= n and extra <= n - 1


# ----------------------------------------------------------- concurrency

def _two_threads(fn_a, fn_b):
    import threading
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
        return run
    ts = [threading.Thread(target=wrap(f)) for f in (fn_a, fn_b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors


@pytest.mark.parametrize("kind", ["adam", "adamw", "sparse"])
def test_two_threads_share_one_optimizer(kind):
    """200 steps from each of two threads on one optimizer: 400 steps, and the
    result of 400 sequential steps (the same gradient every step)."""
    import numpy as np

    import fastadam as fa
    rng = np.random.default_rng(0)

    def make():
        if kind == "sparse":
            t = np.zeros((50, 8), np.float32)
            return [t], fa.SparseAdam(t, lr=0.01)
        ps = [np.zeros(300, np.float32), np.zeros((4, 5))]
        cls = fa.Adam if kind == "adam" else fa.AdamW
        return ps, cls(ps, lr=0.01)

    ids = rng.integers(0, 50, 30)
    gr = rng.standard_normal((30, 8)).astype(np.float32)
    gs = [rng.standard_normal(300).astype(np.float32), rng.standard_normal((4, 5))]

    def step(opt):
        if kind == "sparse":
            opt.step(ids, gr)
        else:
            opt.step(gs)

    ps, opt = make()
    _two_threads(*[lambda: [step(opt) for _ in range(200)]] * 2)
    ref_ps, ref = make()
    for _ in range(400):
        step(ref)
    sd = opt.state_dict()["state"]
    assert all(st["step"] == 400 for st in sd.values())
    for a, b in zip(ps, ref_ps):
        assert a.tobytes() == b.tobytes()


def test_two_threads_two_optimizers_concurrently():
    """Different optimizers step concurrently with the results of stepping
    alone, and the GIL is released in the kernels: a third Python thread
    keeps running meanwhile (as tests/test_runtime.py's GIL test)."""
    import threading

    import numpy as np

    import fastadam as fa
    n = 1 << 22
    g = np.full(n, 0.5, np.float32)
    pa, pb, ra, rb = (np.zeros(n, np.float32) for _ in range(4))
    oa, ob = fa.Adam([pa], lr=0.1, n_threads=1), fa.AdamW([pb], lr=0.1, n_threads=1)
    ref_a, ref_b = fa.Adam([ra], lr=0.1, n_threads=1), fa.AdamW([rb], lr=0.1, n_threads=1)
    for _ in range(5):
        ref_a.step([g])
        ref_b.step([g])
    counter = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            counter[0] += 1
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        _two_threads(lambda: [oa.step([g]) for _ in range(5)],
                     lambda: [ob.step([g]) for _ in range(5)])
    finally:
        stop.set()
        spinner.join()
    assert pa.tobytes() == ra.tobytes() and pb.tobytes() == rb.tobytes()
    assert counter[0] > 1000, counter


# ----------------------------------------------------- sparse workspace

def test_sparse_workspace_is_bounded():
    """10M ids at 64 threads asked for ~58 GB (a full-batch table per
    partition); now the partitions are capped by what the batch needs and
    by SPARSE_WS_MAX_BYTES (256 MiB; one partition always allowed)."""
    from fastadam import _plan
    k = _plan.KERNELS.module
    n, nbytes = k.sparse_parts(64, 10_000_000, 64, 1 << 30)
    assert n >= 1 and (nbytes <= 256 << 20 or n == 1)
    one = k.sparse_parts(1, 10_000_000, 64, 1 << 30)[1]
    assert nbytes <= max(256 << 20, one)
    assert k.sparse_parts(64, 100, 128, 1000)[0] == 1          # 12,800 elements: one part
    assert k.sparse_parts(64, 1000, 64, 1000)[0] == 7          # 64,000 // 8192
    assert k.sparse_parts(2, 100_000, 64, 10**6)[0] == 2


def test_sparse_big_workspace_not_cached():
    import numpy as np

    import fastadam as fa
    from fastadam import _plan
    k = _plan.KERNELS.module
    t = np.zeros((1000, 1), np.float32)
    ids = np.zeros(1_000_000, np.int64)                 # ~100 MB of workspace
    g = np.ones((ids.size, 1), np.float32)
    fa.sparse_adam_step(t, ids, g, np.zeros_like(t), np.zeros_like(t), step=1, n_threads=1)
    assert k.sparse_workspace_cached() <= 64 << 20
    fa.sparse_adam_step(t, ids[:100], g[:100], np.zeros_like(t), np.zeros_like(t), step=1)
    assert 0 < k.sparse_workspace_cached() <= 64 << 20   # small ones are still reused


# ------------------------------------------------------------------ thread creation refused

def test_a_refused_thread_start_runs_on_fewer_threads(monkeypatch):
    """When the OS refuses the threads a team adds, the call runs on those it
    could start (with a RuntimeWarning) instead of libgomp exiting the process;
    a team once proven is not probed again, a larger one is."""
    from fastadam import _threads
    monkeypatch.setattr(_threads, "max_threads", lambda: 8)
    monkeypatch.setattr(_threads, "_proven", __import__("threading").local())
    calls = []

    def refuse_after(k):
        def probe(n, stacksize=0):
            calls.append(n)
            return min(n, k)
        return probe

    monkeypatch.setattr(_threads._runtime, "probe_threads", refuse_after(2))
    with pytest.warns(RuntimeWarning, match="only 2 of the 3 more threads a 4-thread step"):
        assert _threads.resolve(4, 1 << 30) == 3
    assert calls == [3]
    monkeypatch.setattr(_threads._runtime, "probe_threads", refuse_after(10))
    assert _threads.resolve(4, 1 << 30) == 4 and calls == [3, 3]
    assert _threads.resolve(4, 1 << 30) == 4 and _threads.resolve(2, 1 << 30) == 2
    assert calls == [3, 3]                                   # proven: no probe
    assert _threads.resolve(6, 1 << 30) == 6 and calls == [3, 3, 2]   # only the 2 added


def test_stacksize_follows_libgomp_variables(monkeypatch):
    from fastadam import _threads
    monkeypatch.delenv("OMP_STACKSIZE", raising=False)
    monkeypatch.delenv("GOMP_STACKSIZE", raising=False)
    assert _threads._stacksize() == 0
    for value, size in (("64", 64 << 10), ("2M", 2 << 20), ("512 k", 512 << 10),
                        ("1g", 1 << 30), ("4096B", 4096), ("junk", 0)):
        monkeypatch.setenv("OMP_STACKSIZE", value)
        assert _threads._stacksize() == size, value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc")
def test_no_exit_when_the_address_space_cannot_hold_another_thread():
    """Under an address-space limit with no room for a thread's stack, a
    2-thread step used to make libgomp exit the process (rc 1, 'Thread creation
    failed'); now it warns, runs serially, and gives the serial result."""
    from fastadam import _threads
    if _threads.max_threads() < 2:
        pytest.skip("needs 2 usable CPUs")
    out = _run_py("""
        import resource, warnings
        import numpy as np, fastadam as fa
        n = 1 << 16
        bufs = [np.full(n, 0.5, np.float32) for _ in range(4)]
        ref = [b.copy() for b in bufs]
        fa.adam_step(*ref, step=1, lr=1e-3, n_threads=1)
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 20), resource.RLIM_INFINITY))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fa.adam_step(*bufs, step=1, lr=1e-3, n_threads=2)
        print(all(np.array_equal(a, b) for a, b in zip(bufs, ref)),
              any("threads" in str(x.message) for x in w))
    """)
    assert out.split() == ["True", "True"]
