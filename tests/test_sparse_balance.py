"""Dynamic balancing of the sparse kernel (issue 15): buckets taken by the
threads one at a time, a stalled team backing off to one thread, prefetch
distance: none of them changes a bit."""
import numpy as np
import pytest

import fastadam as fa
from fastadam import _plan

K = _plan.KERNELS.module


def _batch(seed, n_rows=50_000, dim=24, k=20_000):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([rng.integers(0, n_rows, k - 2000), rng.integers(0, 40, 2000)])
    rng.shuffle(ids)
    return ids, rng.standard_normal((k, dim)).astype(np.float32)


def _steps(n_threads, n_rows=50_000, dim=24, before=None):
    table = np.linspace(-1, 1, n_rows * dim, dtype=np.float32).reshape(n_rows, dim)
    m, v = np.zeros_like(table), np.zeros_like(table)
    for step in range(1, 4):
        ids, g = _batch(step)
        if before is not None:
            before()
        fa.sparse_adam_step(table, ids, g, m, v, step=step, n_threads=n_threads)
    return b"".join(a.tobytes() for a in (table, m, v))


def test_many_buckets_any_thread_count_bitwise():
    ids, g = _batch(1)
    assert K.sparse_parts(2, ids.size, g.shape[1], 50_000)[0] >= 16
    ref = _steps(1)
    for nt in (2, 3, 4):
        assert _steps(nt) == ref, nt


def test_stall_back_off_runs_serially_with_the_same_bits():
    ref = _steps(2)
    stalls, skip, backoff = K.sparse_stalls()
    assert backoff >= 4 and skip >= 0 and stalls >= 0
    # every call made to back off (as after a stall): one thread, same bits
    assert _steps(2, before=lambda: K.sparse_stalls(serial_calls=1)) == ref
    ids, g = _batch(1)
    t = np.zeros((50_000, 24), np.float32)
    m, v = np.zeros_like(t), np.zeros_like(t)
    K.sparse_stalls(serial_calls=2)
    for left in (1, 0):               # a serial call uses one up (and records no stall)
        fa.sparse_adam_step(t, ids, g, m, v, step=1, n_threads=2)
        assert K.sparse_stalls()[1] == left
    fa.sparse_adam_step(t, ids[:10], g[:10], m, v, step=1, n_threads=2)   # one bucket
    assert K.sparse_stalls()[1] == 0


@pytest.mark.parametrize("distance", [0, 1, 24])
def test_prefetch_distance_changes_no_bit(distance):
    old, old_g = K.sparse_tune(), K.sparse_grad_prefetch()
    ref = _steps(2)
    try:
        K.sparse_tune(distance)
        assert K.sparse_tune() == distance
        assert _steps(2) == ref
        K.sparse_tune(-1, distance)            # the repeated rows' gradient prefetch
        assert K.sparse_grad_prefetch() == distance and K.sparse_tune() == distance
        assert _steps(2) == ref
    finally:
        K.sparse_tune(old, old_g)
    assert (K.sparse_tune(), K.sparse_grad_prefetch()) == (old, old_g)


def test_unique_ids_independent_of_bucket_layout():
    ids, _ = _batch(2)
    want = dict(zip(*np.unique(ids, return_counts=True)))
    for dim in (1, 24, 4096):          # 2, 32 and 512 buckets
        u, c = K.sparse_unique(ids, 50_000, dim)
        assert len(u) == len(want) and dict(zip(u, c)) == want


def test_stall_rule_waits_off_core_time_and_slow_decay():
    """The back-off rule (``_stall_record``): a long barrier wait or the caller off its
    core for a third of the call is a stall; the back-off doubles per stall, up to
    1024, and halves only after 8 clean threaded calls in a row."""
    K.sparse_stalls(serial_calls=0)
    for _ in range(8 * 9):        # clean calls: from any earlier back-off (<= 1024) to 4
        K.sparse_stall_note(1e-3, 1e-5, 1e-5, 1e-3)
    n0, skip, b0 = K.sparse_stalls()
    assert skip == 0 and b0 == 4
    n, skip, b = K.sparse_stall_note(1e-3, 2e-3, 0.0, 3e-3)      # waited longer than worked
    assert (n, skip, b) == (n0 + 1, 4, 8)
    n, skip, b = K.sparse_stall_note(3e-3, 0.0, 1.5e-3, 3e-3)    # preempted half the call
    assert (n, skip, b) == (n0 + 2, 8, 16)
    n, skip, b = K.sparse_stall_note(3e-3, 0.0, 0.5e-3, 3e-3)    # a sixth: not a stall
    assert (n, b) == (n0 + 2, 16)
    n, skip, b = K.sparse_stall_note(1e-5, 5e-5, 1e-5, 6e-5)     # under 100 us: not a stall
    assert (n, b) == (n0 + 2, 16)
    for _ in range(5):                               # 7 clean in a row: no decay yet
        n, skip, b = K.sparse_stall_note(1e-3, 0.0, 0.0, 1e-3)
    assert b == 16
    n, skip, b = K.sparse_stall_note(1e-3, 0.0, 0.0, 1e-3)       # the 8th halves it
    assert b == 8
    for _ in range(12):
        K.sparse_stall_note(1e-3, 2e-3, 0.0, 3e-3)
    assert K.sparse_stalls()[2] == 1024              # capped
    K.sparse_stalls(serial_calls=0)
    for _ in range(8 * 9):                           # decays back to the floor
        K.sparse_stall_note(1e-3, 0.0, 0.0, 1e-3)
    assert K.sparse_stalls()[1:] == (0, 4)
