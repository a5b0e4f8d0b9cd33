"""Hardening: consistent argument checks, alignment, overflow, aliasing, checkpoints."""
import numpy as np
import pytest
from conftest import assert_bitwise, copies, make_state

import fastadam as fa
from fastadam import functional as F

N = 64


def _dense(dtype=np.float32, n=N):
    return list(make_state(n, dtype))


def _sparse(dtype=np.float32, rows=10, dim=4, k=6):
    rng = np.random.default_rng(1)
    t = rng.standard_normal((rows, dim)).astype(dtype)
    ids = rng.integers(0, rows, k)
    g = rng.standard_normal((k, dim)).astype(dtype)
    return [t, ids, g, np.zeros_like(t), np.zeros_like(t)]


def _rejects(fn, bufs, exc, match):
    before = copies(bufs)
    with pytest.raises(exc, match=match):
        fn()
    assert_bitwise(bufs, before, "a rejected call wrote")


# ------------------------------------------------------ finding 6: scalars

BAD_SCALARS = [
    # (kwargs, exception, the argument named)
    (dict(lr=True), TypeError, "lr"),
    (dict(lr=np.True_), TypeError, "lr"),
    (dict(lr="0.1"), TypeError, "lr"),
    (dict(lr=np.array("0.1")), TypeError, "lr"),
    (dict(lr=10**400), ValueError, "lr"),
    (dict(lr=-(10**400)), ValueError, "lr"),
    (dict(eps=False), TypeError, "eps"),
    (dict(eps=10**400), ValueError, "eps"),
    (dict(weight_decay="1"), TypeError, "weight_decay"),
    (dict(weight_decay=True), TypeError, "weight_decay"),
    (dict(betas="ab"), TypeError, "betas"),
    (dict(betas="12"), TypeError, "betas"),
    (dict(betas=(True, 0.9)), TypeError, r"betas\[0\]"),
    (dict(betas=(0.9, "0.9")), TypeError, r"betas\[1\]"),
    (dict(betas=(0.9, 10**400)), ValueError, r"betas\[1\]"),
    (dict(step=True), TypeError, "step"),
    (dict(step="1"), TypeError, "step"),
    (dict(step=10**400), ValueError, "step"),
    (dict(step=2**63), ValueError, "step"),
    (dict(step=1e300), ValueError, "step"),
    (dict(n_threads=True), TypeError, "n_threads"),
    (dict(n_threads="2"), TypeError, "n_threads"),
    (dict(maximize="false"), TypeError, "maximize"),
    (dict(amsgrad=1), TypeError, "amsgrad"),
    (dict(decoupled_weight_decay="yes"), TypeError, "decoupled_weight_decay"),
]
DENSE_ONLY = [
    (dict(grad_scale="2"), TypeError, "grad_scale"),
    (dict(grad_scale=True), TypeError, "grad_scale"),
    (dict(grad_scale=10**400), ValueError, "grad_scale"),
]


# the optimizers count their own steps: no 'step' case for them
DENSE_CASES = [(c, e) for c in BAD_SCALARS + DENSE_ONLY
               for e in ("adam_step", "adam_list", "optim")
               if not (e == "optim" and c[2] == "step")]


@pytest.mark.parametrize("case,entry", DENSE_CASES,
                         ids=[f"{e}-{repr(c[0])[:40]}" for c, e in DENSE_CASES])
def test_bad_scalar_dense(case, entry):
    kw, exc, name = case
    b = _dense()
    p, g, m, v, vm = b
    kw = dict(kw)
    step = kw.pop("step", 1)
    if entry == "adam_step":
        _rejects(lambda: fa.adam_step(p, g, m, v, step=step, max_exp_avg_sq=vm, **kw),
                 b, exc, name)
    elif entry == "adam_list":
        p2, g2, m2, v2, vm2 = _dense(np.float64)
        b += [p2, g2, m2, v2, vm2]
        _rejects(lambda: F.adam([p, p2], [g, g2], [m, m2], [v, v2], steps=step,
                                max_exp_avg_sqs=[vm, vm2], **kw), b, exc, name)
    else:
        if "step" in name or "grad_scale" in name:
            opt = fa.Adam([p])
            _rejects(lambda: opt.step([g], grad_scale=kw["grad_scale"]), b, exc, name)
        else:
            with pytest.raises(exc, match=name):
                fa.Adam([p], **kw)


@pytest.mark.parametrize("kw,exc,name", BAD_SCALARS, ids=[repr(c[0])[:40] for c in BAD_SCALARS])
def test_bad_scalar_sparse(kw, exc, name):
    b = _sparse()
    kw = dict(kw)
    step = kw.pop("step", 1)
    _rejects(lambda: fa.sparse_adam_step(*b, step=step, **kw), b, exc, name)
    _rejects(lambda: F.plan_sparse_adam(*b, step=step, **kw), b, exc, name)
    if name not in ("step",):
        with pytest.raises(exc, match=name):
            fa.SparseAdam(b[0], **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("gs", [1e-46, 1e39, 1e-39, 5e-324, 1e309 / 10, 1.7e308])
def test_grad_scale_out_of_range_for_the_arithmetic(dtype, gs):
    """Rounded to float32, 1e-46 is 0 (NaN gradients) and 1e39 is inf (zero
    gradients): rejected for float32 calls; float64 takes what it can."""
    b = _dense(dtype)
    p, g, m, v, _ = b
    ct = np.float32 if dtype == np.float32 else np.float64
    with np.errstate(all="ignore"):
        ok = np.isfinite(ct(gs)) and ct(gs) > 0 and np.isfinite(1 / ct(gs)) and 1 / ct(gs) > 0
    if ok:
        fa.adam_step(p, g, m, v, step=1, grad_scale=gs)
        assert np.isfinite(p).all()
    else:
        _rejects(lambda: fa.adam_step(p, g, m, v, step=1, grad_scale=gs), b, ValueError,
                 "grad_scale")
        _rejects(lambda: F.adam([p, p.copy()], [g, g], [m, m.copy()], [v, v.copy()], steps=1,
                                grad_scale=gs), b, ValueError, "grad_scale")


def test_grad_scale_checked_per_dtype_of_a_mixed_list():
    p32, g32, m32, v32, _ = _dense(np.float32)
    p64, g64, m64, v64, _ = _dense(np.float64)
    # fine for float64 alone
    F.adam([p64, p64.copy()], [g64, g64], [m64, m64.copy()], [v64, v64.copy()], steps=1,
           grad_scale=1e39)
    b = [p32, m32, v32, p64, m64, v64]
    _rejects(lambda: F.adam([p64, p32], [g64, g32], [m64, m32], [v64, v32], steps=1,
                            grad_scale=1e39), b, ValueError, "grad_scale")


def test_good_scalars_still_accepted():
    p, g, m, v, _ = _dense()
    fa.adam_step(p, g, m, v, step=np.int64(3), lr=np.float32(0.1), betas=[0.5, np.float64(0.9)],
                 eps=0, weight_decay=np.array(0.1), grad_scale=2, maximize=np.bool_(True),
                 n_threads=np.int64(1))
    fa.adam_step(p, g, m, v, step=2.0, lr=1, betas=(0, 0))
    fa.adam_step(p, g, m, v, step=2**63 - 1)


# ------------------------------------------- finding 7: load_state_dict

def _adam_opt():
    rng = np.random.default_rng(2)
    ps = [rng.standard_normal(5).astype(np.float32), rng.standard_normal((2, 3)),
          rng.standard_normal(4).astype(np.float32)]
    opt = fa.Adam([{"params": ps[:2]}, {"params": ps[2:], "amsgrad": True, "lr": 0.01}])
    for _ in range(2):
        opt.step([np.ones_like(p) for p in ps])
    return opt, ps


def _snapshot(opt):
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()}
              for g in opt.param_groups]
    state = {pid: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
             for pid, st in opt.state.items()}
    return groups, state, {pid: {k: id(v) for k, v in st.items()} for pid, st in opt.state.items()}


def _assert_same(opt, snap):
    groups, state, ids = snap
    now = _snapshot(opt)
    assert now[0] == groups
    assert [[type(v) for v in g.values()] for g in now[0]] == \
        [[type(v) for v in g.values()] for g in groups]
    assert now[2] == ids
    for pid, st in state.items():
        for k, v in st.items():
            if isinstance(v, np.ndarray):
                assert_bitwise([opt.state[pid][k]], [v])
            else:
                assert opt.state[pid][k] == v and type(opt.state[pid][k]) is type(v)


def _sd_copy(opt):
    import copy
    return copy.deepcopy(opt.state_dict())


def _mut(fn):
    def make(sd):
        fn(sd)
        return sd
    return make


ADAM_BAD_SD = [
    ("missing-exp_avg", _mut(lambda sd: sd["state"][1].pop("exp_avg")), ValueError, "exp_avg"),
    ("missing-vmax-amsgrad", _mut(lambda sd: sd["state"][2].pop("max_exp_avg_sq")), ValueError,
     "max_exp_avg_sq"),
    ("missing-step", _mut(lambda sd: sd["state"][0].pop("step")), ValueError, "step"),
    ("lr-negative", _mut(lambda sd: sd["param_groups"][1].update(lr=-1)), ValueError, "lr"),
    ("lr-nan", _mut(lambda sd: sd["param_groups"][0].update(lr=float("nan"))), ValueError, "lr"),
    ("lr-str", _mut(lambda sd: sd["param_groups"][0].update(lr="0.1")), TypeError, "lr"),
    ("betas-str", _mut(lambda sd: sd["param_groups"][0].update(betas="ab")), TypeError, "betas"),
    ("betas-range", _mut(lambda sd: sd["param_groups"][0].update(betas=(0.9, 1.0))), ValueError,
     "betas"),
    ("eps-inf", _mut(lambda sd: sd["param_groups"][1].update(eps=float("inf"))), ValueError,
     "eps"),
    ("maximize-str", _mut(lambda sd: sd["param_groups"][0].update(maximize="false")), TypeError,
     "maximize"),
    ("amsgrad-int", _mut(lambda sd: sd["param_groups"][0].update(amsgrad=1)), TypeError,
     "amsgrad"),
    ("fused-str", _mut(lambda sd: sd["param_groups"][0].update(fused="no")), TypeError, "fused"),
    ("index-out-of-range", _mut(lambda sd: sd["param_groups"][1].update(params=[7])),
     ValueError, "permutation"),
    ("index-repeated", _mut(lambda sd: sd["param_groups"][1].update(params=[0])), ValueError,
     "permutation"),
    ("index-bool", _mut(lambda sd: sd["param_groups"][1].update(params=[True])), TypeError,
     "ints"),
    ("group-size", _mut(lambda sd: sd["param_groups"][0].update(params=[0])), ValueError,
     "sizes"),
    ("groups-count", _mut(lambda sd: sd["param_groups"].pop()), ValueError, "param groups"),
    ("state-key-out-of-range", _mut(lambda sd: sd["state"].update({9: sd["state"][0]})),
     ValueError, "state key"),
    ("state-key-junk", _mut(lambda sd: sd["state"].update({"x": sd["state"][0]})),
     ValueError, "state key"),
    ("shape", _mut(lambda sd: sd["state"][1].update(exp_avg=np.zeros(6))), ValueError, "shape"),
    ("dtype-str", _mut(lambda sd: sd["state"][0].update(exp_avg=np.array(["a"] * 5))),
     TypeError, "exp_avg"),
    ("dtype-complex", _mut(lambda sd: sd["state"][0].update(exp_avg=np.zeros(5, complex))),
     TypeError, "exp_avg"),
    ("overflow-f32", _mut(lambda sd: sd["state"][0].update(exp_avg=np.full(5, 1e300))),
     ValueError, "too large"),
    ("negative-v", _mut(lambda sd: sd["state"][2].update(exp_avg_sq=-np.ones(4))), ValueError,
     "negative"),
    ("step-negative", _mut(lambda sd: sd["state"][0].update(step=-1)), ValueError, "step"),
    ("step-fraction", _mut(lambda sd: sd["state"][0].update(step=1.5)), ValueError, "step"),
    ("step-bool", _mut(lambda sd: sd["state"][0].update(step=True)), TypeError, "step"),
    ("step-huge", _mut(lambda sd: sd["state"][0].update(step=2**64)), ValueError, "step"),
    ("unknown-key", _mut(lambda sd: sd["state"][0].update(junk=1)), ValueError, "junk"),
    ("not-a-dict", lambda sd: [sd], TypeError, "state_dict"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in ADAM_BAD_SD],
                         ids=[c[0] for c in ADAM_BAD_SD])
def test_adam_load_state_dict_rejects_and_changes_nothing(make, exc, match):
    opt, ps = _adam_opt()
    bad = make(_sd_copy(opt))
    snap = _snapshot(opt)
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad)
    _assert_same(opt, snap)
    # and it still steps
    opt.step([np.ones_like(p) for p in ps])


def test_adam_load_state_dict_good_variants():
    opt, ps = _adam_opt()
    sd = _sd_copy(opt)
    sd["state"] = {str(k): v for k, v in sd["state"].items()}      # JSON-style keys
    sd["state"]["0"]["step"] = np.float64(2.0)
    sd["param_groups"][0]["maximize"] = np.bool_(False)
    opt2 = fa.Adam([{"params": [p.copy() for p in ps[:2]]},
                    {"params": [ps[2].copy()], "amsgrad": True}])
    opt2.load_state_dict(sd)
    assert opt2.param_groups[1]["lr"] == 0.01
    assert opt2.state_dict()["state"][0]["step"] == 2
    del sd["state"]["1"]          # a param without state is fine (created on the next step)
    opt2.load_state_dict(sd)
    assert len(opt2.state) == 2


SPARSE_BAD_SD = [
    ("lr-negative", _mut(lambda sd: sd["param_groups"][0].update(lr=-1)), ValueError, "lr"),
    ("maximize-str", _mut(lambda sd: sd["param_groups"][0].update(maximize="false")), TypeError,
     "maximize"),
    ("amsgrad-missing-vmax", _mut(lambda sd: sd["param_groups"][0].update(amsgrad=True)),
     ValueError, "max_exp_avg_sq"),
    ("shape", _mut(lambda sd: sd["state"][0].update(exp_avg_sq=np.zeros((3, 3)))), ValueError,
     "shape"),
    ("dtype-str", _mut(lambda sd: sd["state"][0].update(exp_avg_sq=np.full((10, 4), "x"))),
     TypeError, "exp_avg_sq"),
    ("negative-v", _mut(lambda sd: sd["state"][0].update(exp_avg_sq=-np.ones((10, 4)))),
     ValueError, "negative"),
    ("step", _mut(lambda sd: sd["state"][0].update(step="3")), TypeError, "step"),
    ("betas-str", _mut(lambda sd: sd["param_groups"][0].update(betas="ab")), TypeError, "betas"),
    ("extra-state", _mut(lambda sd: sd["state"].update({1: {}})), ValueError, "state"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in SPARSE_BAD_SD],
                         ids=[c[0] for c in SPARSE_BAD_SD])
def test_sparse_load_state_dict_rejects_and_changes_nothing(make, exc, match, tmp_path):
    t = np.zeros((10, 4), np.float32)
    m = np.lib.format.open_memmap(tmp_path / "m.npy", "w+", np.float32, (10, 4))
    v = np.lib.format.open_memmap(tmp_path / "v.npy", "w+", np.float32, (10, 4))
    opt = fa.SparseAdam(t, lr=0.1, exp_avg=m, exp_avg_sq=v)
    opt.step(np.array([1, 2, 2]), np.ones((3, 4), np.float32))
    good = _sd_copy(opt)
    good["state"][0]["exp_avg"] = good["state"][0]["exp_avg"] + 1   # differs from the live state
    bad = make(good)
    group = dict(opt.param_groups[0])
    before = copies([m, v, t])
    with pytest.raises(exc, match=match):
        opt.load_state_dict(bad)
    assert opt.param_groups[0] == group
    assert opt.state["exp_avg"] is m and opt.state["exp_avg_sq"] is v
    assert_bitwise([m, v, t], before)
    assert opt.state["step"] == 1


# ------------------------------------ finding 4: alignment, count overflow

def _unaligned(a):
    """A copy of ``a`` whose data address is NOT a multiple of its itemsize."""
    buf = np.zeros(a.nbytes + a.itemsize, np.uint8)
    u = np.frombuffer(buf, a.dtype, count=a.size, offset=1).reshape(a.shape)
    u[...] = a
    assert not u.flags.aligned
    return u


@pytest.mark.parametrize("which", range(5))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unaligned_dense_buffers_rejected(which, dtype):
    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    b = _dense(dtype)
    b[which] = _unaligned(b[which])
    p, g, m, v, vm = b
    _rejects(lambda: fa.adam_step(p, g, m, v, step=1, amsgrad=True, max_exp_avg_sq=vm),
             b, ValueError, names[which] + " is not aligned")
    b2 = _dense(dtype)
    lists = [[x, y.copy()] for x, y in zip(b, b2)]
    _rejects(lambda: F.adam(*lists[:4], steps=1, amsgrad=True, max_exp_avg_sqs=lists[4]),
             b + b2, ValueError, rf"{names[which]}s\[0\] is not aligned")
    _rejects(lambda: fa.grad_norm([b[which]]), b, ValueError, "not aligned") if which == 1 \
        else None


@pytest.mark.parametrize("which", [0, 2, 3, 4])
def test_unaligned_sparse_buffers_rejected(which):
    names = ["table", "indices", "grad_rows", "exp_avg", "exp_avg_sq"]
    b = _sparse()
    b[which] = _unaligned(b[which])
    _rejects(lambda: fa.sparse_adam_step(*b, step=1), b, ValueError,
             names[which] + " is not aligned")


def test_unaligned_indices_are_copied_not_misread():
    b = _sparse()
    ref = copies(b)
    b[1] = _unaligned(b[1])
    fa.sparse_adam_step(*b, step=1)
    fa.sparse_adam_step(*ref, step=1)
    assert_bitwise([b[0], b[3], b[4]], [ref[0], ref[3], ref[4]])


@pytest.mark.parametrize("idt", [np.int64, np.int32, np.uint64])
def test_unaligned_indices_copy_is_aligned(idt):
    """Found by the sanitizer job (scripts/sanitize.sh): an unaligned int64 ``indices``
    was passed on as it was (np.ascontiguousarray keeps an unaligned C-contiguous array)
    and the merge loaded misaligned int64_t (UBSan: 'load of misaligned address')."""
    ids = _unaligned(np.array([3, 1, 4, 1, 5, 9], idt))
    out = F._check_indices(ids, 10)
    assert out.flags.aligned and out.flags.c_contiguous and out.dtype in (np.int32, np.int64)
    assert out.ctypes.data % out.itemsize == 0
    np.testing.assert_array_equal(out, ids)


def test_unaligned_row_step_rejected():
    b = _sparse()
    rs = _unaligned(np.zeros(10, np.int64))
    _rejects(lambda: fa.sparse_adam_step(*b, row_step=rs), b + [rs], ValueError,
             "row_step is not aligned")


@pytest.mark.parametrize("plan", [False, True])
def test_row_step_at_int64_max_rejected(plan):
    """row_step = 2**63-1: its increment would overflow (the row became NaN and
    its count -2**63): rejected before any write, naming the row."""
    b = _sparse()
    rs = np.zeros(10, np.int64)
    rs[int(b[1][-1])] = np.iinfo(np.int64).max
    rs[int(b[1][0])] = np.iinfo(np.int64).max - 1  # fine: becomes INT64_MAX
    fn = (lambda: F.plan_sparse_adam(*b, row_step=rs)) if plan else \
        (lambda: fa.sparse_adam_step(*b, row_step=rs))
    _rejects(fn, b + [rs], ValueError, r"row_step\[\d+\] = 9223372036854775807")
    rs[int(b[1][-1])] = 0
    fa.sparse_adam_step(*b, row_step=rs)
    assert rs[int(b[1][0])] == np.iinfo(np.int64).max
    assert np.isfinite(b[0]).all()


# ------------------------------------------- finding 5: aliasing in Adam

@pytest.mark.parametrize("case", ["view-in-other-group", "same-base-overlap",
                                  "grad-is-other-groups-param", "state-aliases"])
def test_aliasing_across_param_groups_rejected(case):
    a = np.zeros(20, np.float32)
    other = np.zeros(8, np.float32)
    if case == "view-in-other-group":
        groups = [{"params": [a]}, {"params": [a[5:10]], "lr": 0.1}]
        grads = [np.ones(20, np.float32), np.ones(5, np.float32)]
    elif case == "same-base-overlap":
        groups = [{"params": [a[:12], other]}, {"params": [a[10:]]}]
        grads = [np.ones(12, np.float32), np.ones(8, np.float32), np.ones(10, np.float32)]
    elif case == "grad-is-other-groups-param":
        groups = [{"params": [a]}, {"params": [other]}]
        grads = [np.ones(20, np.float32), a[:8]]
    else:
        groups = [{"params": [a]}, {"params": [other]}]
        grads = [np.ones(20, np.float32), np.ones(8, np.float32)]
    if case in ("view-in-other-group", "same-base-overlap"):
        with pytest.raises(ValueError, match="share memory"):   # caught at construction
            fa.Adam(groups)
        assert not a.any()
        return
    opt = fa.Adam(groups)
    if case == "state-aliases":
        opt.step(grads)
        opt.state[id(other)]["exp_avg"] = opt.state[id(a)]["exp_avg_sq"][:8]
    snap = _snapshot(opt)
    before = copies([a, other] + grads)
    with pytest.raises(ValueError, match="share memory"):
        opt.step(grads)
    assert_bitwise([a, other] + grads, before)
    _assert_same(opt, snap)


def test_overlapping_views_in_one_group_rejected():
    a = np.zeros(30, np.float32)
    ps = [a[0:10], a[20:30], a[8:12]]          # disjoint pair with a gap, then an overlap
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] share memory"):
        fa.Adam(ps)
    opt = fa.Adam(ps[:2])
    opt.param_groups[0]["params"].append(ps[2])   # slipped past add_param_group: the step checks
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] share memory"):
        opt.step([np.ones_like(p) for p in ps])
    assert not a.any()
    fa.Adam([a[0:10], a[20:30]]).step([np.ones(10, np.float32)] * 2)   # gaps are fine


# ------------------------------------------------ finding 9: non-finite

def _poison(a, rng, k=3):
    a = a.copy()
    flat = a.reshape(-1)
    for val in (np.nan, np.inf, -np.inf)[:k]:
        flat[rng.integers(0, flat.size)] = val
    return a


def _same_nonfinite(actual, expected, dtype, bitwise):
    for a, e in zip(actual, expected):
        if bitwise:
            # NaN payloads may differ between numpy and the kernels: compare classes there
            nan = np.isnan(e)
            assert np.array_equal(np.isnan(a), nan)
            assert_bitwise([np.where(nan, 0, a)], [np.where(nan, 0, e)])
        else:
            assert np.array_equal(np.isnan(a), np.isnan(e))
            assert np.array_equal(np.isposinf(a), np.isposinf(e))
            assert np.array_equal(np.isneginf(a), np.isneginf(e))
            fin = np.isfinite(e)
            from conftest import assert_close
            assert_close([np.where(fin, a, 0)], [np.where(fin, e, 0)], dtype)


@pytest.mark.parametrize("where", ["grad", "param", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_dense_propagates_like_the_reference(where, amsgrad, dtype, use_isa):
    """NaN/inf in a gradient, param or state propagate (torch fused does the
    same): the same elements become non-finite on every ISA module and
    thread count as in the numpy reference; the others are unaffected."""
    from conftest import importable_isas

    from fastadam import _reference as R
    rng = np.random.default_rng(3)
    base = list(make_state(5000, dtype))
    i = ["param", "grad", "exp_avg", "exp_avg_sq"].index(where)
    base[i] = _poison(base[i], rng)
    if where == "exp_avg_sq":
        base[i] = np.abs(base[i])
    ref = copies(base)
    with np.errstate(all="ignore"):
        R.adam(ref[0], ref[1], ref[2], ref[3], step=3, lr=0.01, weight_decay=0.1,
               amsgrad=amsgrad, max_exp_avg_sq=ref[4])
    results = []
    for isa in importable_isas():
        use_isa(isa)
        for nt in (1, 2):
            b = copies(base)
            fa.adam_step(b[0], b[1], b[2], b[3], step=3, lr=0.01, weight_decay=0.1,
                         amsgrad=amsgrad, max_exp_avg_sq=b[4], n_threads=nt)
            _same_nonfinite(b[:4] + b[4:] * amsgrad, ref[:4] + ref[4:] * amsgrad, dtype, False)
            results.append(b)
    for b in results[1:]:
        assert_bitwise(b, results[0], "ISA modules / thread counts differ")


@pytest.mark.parametrize("where", ["grad_rows", "table", "exp_avg", "exp_avg_sq"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_sparse_matches_reference_bitwise(where, dtype, use_isa):
    from conftest import importable_isas

    from fastadam import _reference as R
    rng = np.random.default_rng(4)
    t, ids, g, m, v = _sparse(dtype, rows=50, dim=16, k=400)
    v = np.abs(v) + 0.01
    b = dict(table=t, grad_rows=g, exp_avg=m, exp_avg_sq=v)
    b[where] = _poison(b[where], rng)
    if where == "exp_avg_sq":
        b[where] = np.abs(b[where])
    base = [b["table"], ids, b["grad_rows"], b["exp_avg"], b["exp_avg_sq"]]
    ref = copies(base)
    with np.errstate(all="ignore"):
        R.sparse_adam(*ref, step=2, lr=0.01)
    for isa in importable_isas():
        use_isa(isa)
        for nt in (1, 2):
            x = copies(base)
            fa.sparse_adam_step(*x, step=2, lr=0.01, n_threads=nt)
            _same_nonfinite([x[0], x[3], x[4]], [ref[0], ref[3], ref[4]], dtype, True)


@pytest.mark.parametrize("val", [np.nan, np.inf, -np.inf, None])
def test_grad_norm_non_finite_exactly_when_an_element_is(val):
    rng = np.random.default_rng(5)
    gs = [rng.standard_normal(n).astype(dt) for n, dt in ((100, np.float32), (70000, np.float64),
                                                          (3, np.float32))]
    if val is not None:
        gs[1][12345] = val
    for nt in (1, 2):
        r = fa.grad_norm(gs, n_threads=nt)
        assert np.isfinite(r) == (val is None)
        if val is not None:
            assert np.isnan(r) == np.isnan(val)
    big = [np.full(10, 1e200)]           # squares overflow double, the norm does not
    assert np.isfinite(fa.grad_norm(big))


def test_add_param_group_rejects_a_view_of_an_existing_parameter():
    """An array in one group and a view of it in another is caught when the
    group is added (not only at the next step), and nothing is added."""
    w = np.zeros(16, np.float32)
    opt = fa.Adam([w])
    for view in (w[4:12], w.reshape(4, 4)[1]):
        with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
            opt.add_param_group({"params": [view]})
        assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"params\[0\] and params\[3\] share memory"):
        opt.add_param_group({"params": [np.zeros(4), w[2:6].copy(), w[:3]]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [np.zeros(4)]})        # disjoint memory is fine
    assert len(opt.param_groups) == 2
