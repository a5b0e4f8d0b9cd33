"""fastadam.torch plans every param group before it writes any.

A bad hyperparameter, row id or ``grad_scale`` met in a LATER param group is
rejected before an earlier group is stepped: every parameter, every state
value and every ``step`` stays bit-identical (state created for a first step
may remain, zeroed, as with torch). After the bad value is put right the
next step is the one the optimizer would have taken anyway.
"""
import copy
import math

import pytest

torch = pytest.importorskip("torch")

from fastadam import torch as fat  # noqa: E402

NAN = math.nan
# (group key, bad value, message) -- every hyperparameter of Adam/AdamW
BAD_DENSE = [("lr", -1.0, "lr must be"), ("lr", NAN, "lr must be"),
             ("betas", (1.0, 0.999), r"betas\[0\]"), ("betas", (0.9, -0.1), r"betas\[1\]"),
             ("eps", -1.0, "eps must be"), ("weight_decay", -1.0, "weight_decay must be")]
# SparseAdam has no weight_decay
BAD_SPARSE = [b for b in BAD_DENSE if b[0] != "weight_decay"]
BAD_SCALE = [0.0, -1.0, NAN, math.inf]
IDS = [[1, 5, 1, 7], [2, 7, 7, 19], [0, 3, 12]]


def _bytes(x):
    if isinstance(x, torch.Tensor):
        x = x.detach().contiguous()
        bits = x.view(torch.int16) if x.dtype == torch.bfloat16 else x   # numpy has no bf16
        return x.dtype, tuple(x.shape), bits.numpy().tobytes()
    return (type(x), x)


def _params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def _snapshot(opt):
    """Bytes of every parameter, its state tensors and its step (None: no state)."""
    out = []
    for p in _params(opt):
        st = opt.state.get(p)
        out.append((_bytes(p), None if not st else {k: _bytes(v) for k, v in st.items()}))
    return out


def _assert_unchanged(opt, before):
    for i, (p, (pb, sb)) in enumerate(zip(_params(opt), before)):
        assert _bytes(p) == pb, f"parameter {i} was written"
        st = opt.state.get(p)
        if sb is None:   # state created lazily by the rejected call: zeroed, step 0
            for k, v in (st or {}).items():
                assert float(v.abs().sum() if isinstance(v, torch.Tensor) else v) == 0.0, \
                    f"new state {k!r} of parameter {i} is not zero"
            continue
        assert st is not None and set(st) == set(sb), f"state keys of parameter {i}"
        for k in sb:
            assert _bytes(st[k]) == sb[k], f"state {k!r} of parameter {i} was written"


def _run_case(build, set_grads, spoil, exc, match, warm):
    """Two identical (params, optimizer) pairs; spoil one, check the rejected step
    writes nothing, put it right, and check both then take the same step."""
    pa, oa = build()
    pb, ob = build()
    if warm:
        for ps, o in ((pa, oa), (pb, ob)):
            set_grads(ps, 0)
            o.step()
    set_grads(pa, 1)
    set_grads(pb, 1)
    before = _snapshot(oa)
    undo = spoil(oa, pa)
    with pytest.raises(exc, match=match):
        oa.step()
    _assert_unchanged(oa, before)
    undo()
    oa.step()
    ob.step()
    assert _snapshot(oa) == _snapshot(ob)


def _spoil_group(gi, key, bad):
    def spoil(opt, ps):
        good = opt.param_groups[gi][key]
        opt.param_groups[gi][key] = bad
        return lambda: opt.param_groups[gi].__setitem__(key, good)
    return spoil


# -- dense: Adam, AdamW ------------------------------------------------------------------------

def _dense_build(cls, amsgrad, dtype=torch.float32):
    def build():
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
              for s in [(16,), (4, 4), (8,)]]
        ps.append(torch.nn.Parameter(torch.randn(6, 4, generator=g).to(dtype).t()))  # permuted
        opt = getattr(fat, cls)([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}],
                                lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
        return ps, opt
    return build


def _dense_grads(ps, seed):
    g = torch.Generator().manual_seed(100 + seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
@pytest.mark.parametrize("key,bad,match", BAD_DENSE, ids=[f"{k}={v}" for k, v, _ in BAD_DENSE])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_dense_bad_hyper_in_later_group_writes_nothing(cls, key, bad, match, amsgrad, warm):
    _run_case(_dense_build(cls, amsgrad), _dense_grads, _spoil_group(1, key, bad), ValueError,
              match, warm)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("key,bad,match", BAD_DENSE[:3],
                         ids=[f"{k}={v}" for k, v, _ in BAD_DENSE[:3]])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_dense_16bit_bad_hyper_in_later_group_writes_nothing(dtype, key, bad, match, warm):
    # 16-bit params take the native validation path too (all-16-bit kernels)
    _run_case(_dense_build("AdamW", False, dtype), _dense_grads, _spoil_group(1, key, bad),
              ValueError, match, warm)


# -- SparseAdam ----------------------------------------------------------------------------------

def _coo(ids, n, d, seed, dtype=torch.float32):
    """An uncoalesced COO gradient with duplicates, as nn.Embedding(sparse=True) makes."""
    g = torch.Generator().manual_seed(200 + seed)
    ix = torch.tensor([ids])
    return torch.sparse_coo_tensor(ix, torch.randn(len(ids), d, generator=g, dtype=dtype),
                                   (n, d), check_invariants=False)


def _sparse_build():
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(20, 4, generator=g)),
          torch.nn.Parameter(torch.randn(30, 2, generator=g))]
    return ps, fat.SparseAdam([{"params": ps[:1]}, {"params": ps[1:], "lr": 3e-3}], lr=1e-2)


def _sparse_grads(ps, seed):
    for j, p in enumerate(ps):
        p.grad = _coo(IDS[(seed + j) % 3], *p.shape, seed * 10 + j)


def _spoil_grad(index, make_bad):
    """Replace the gradient of parameter ``index`` (of the build's list) by a bad one."""
    def spoil(opt, ps):
        good = ps[index].grad
        ps[index].grad = make_bad(ps[index])
        return lambda: setattr(ps[index], "grad", good)
    return spoil


def _bad_row(p):
    n, d = p.shape
    return _coo([0, 2, n], n, d, 7)   # id n: one past the last row


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("key,bad,match", BAD_SPARSE, ids=[f"{k}={v}" for k, v, _ in BAD_SPARSE])
def test_sparse_adam_bad_hyper_in_later_group_writes_nothing(key, bad, match, warm):
    _run_case(_sparse_build, _sparse_grads, _spoil_group(1, key, bad), ValueError, match, warm)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
def test_sparse_adam_bad_row_id_in_later_param_writes_nothing(warm):
    _run_case(_sparse_build, _sparse_grads, _spoil_grad(1, _bad_row), IndexError,
              r"indices\[2\] = 30 is out of range", warm)


# -- mixed: nn.Embedding(sparse=True) + nn.Linear in one Adam ----------------------------------

class _Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8, sparse=True)
        self.lin = torch.nn.Linear(8, 3)
        self.emb2 = torch.nn.Embedding(12, 3, sparse=True)

    def forward(self, ids):
        return self.lin(self.emb(ids).mean(1)) + self.emb2(ids % 12).mean(1)


def _mixed_build(cls, order, amsgrad=False):
    def build():
        torch.manual_seed(0)
        m = _Bag()
        dense = list(m.lin.parameters())
        groups = {"dense_first": [dense, [m.emb.weight, m.emb2.weight]],
                  "sparse_first": [[m.emb.weight, m.emb2.weight], dense],
                  "two_tables": [dense + [m.emb.weight], [m.emb2.weight]]}[order]
        opt = getattr(fat, cls)([{"params": groups[0]}, {"params": groups[1], "lr": 3e-3}],
                                lr=1e-2, amsgrad=amsgrad, weight_decay=0.01)
        return m, opt
    return build


def _mixed_grads(m, seed):
    g = torch.Generator().manual_seed(300 + seed)
    ids = torch.randint(0, 20, (6, 4), generator=g)
    y = torch.randint(0, 3, (6,), generator=g)
    m.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(ids), y).backward()
    assert m.emb.weight.grad.is_sparse and not m.lin.weight.grad.is_sparse


def _spoil_mixed_grad(make_bad):
    def spoil(opt, m):
        good = m.emb2.weight.grad
        m.emb2.weight.grad = make_bad(m.emb2.weight)
        return lambda: setattr(m.emb2.weight, "grad", good)
    return spoil


def _spoil_scale(value):
    def spoil(opt, m):
        opt.grad_scale = torch.tensor(value)
        opt.found_inf = torch.tensor(0.0)

        def undo():
            del opt.grad_scale, opt.found_inf
        return undo
    return spoil


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("key,bad,match", BAD_DENSE, ids=[f"{k}={v}" for k, v, _ in BAD_DENSE])
@pytest.mark.parametrize("order", ["dense_first", "sparse_first"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_mixed_bad_hyper_in_later_group_writes_nothing(cls, order, key, bad, match, warm):
    _run_case(_mixed_build(cls, order), _mixed_grads, _spoil_group(1, key, bad), ValueError,
              match, warm)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("order", ["dense_first", "two_tables"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["", "amsgrad"])
def test_mixed_bad_row_id_in_later_group_writes_nothing(order, amsgrad, warm):
    """The later group's table gets an id out of range: no group is stepped."""
    _run_case(_mixed_build("Adam", order, amsgrad), _mixed_grads, _spoil_mixed_grad(_bad_row),
              IndexError, r"indices\[2\] = 12 is out of range", warm)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
@pytest.mark.parametrize("order", ["dense_first", "sparse_first"])
@pytest.mark.parametrize("scale", BAD_SCALE)
def test_mixed_bad_grad_scale_writes_nothing(scale, order, warm):
    """GradScaler's grad_scale is validated before the sparse path divides by it."""
    _run_case(_mixed_build("AdamW", order), _mixed_grads, _spoil_scale(scale), ValueError,
              "grad_scale must be", warm)


@pytest.mark.parametrize("warm", [False, True], ids=["first_step", "later_step"])
def test_mixed_found_inf_skips_before_any_write(warm):
    build = _mixed_build("Adam", "sparse_first")
    m, opt = build()
    if warm:
        _mixed_grads(m, 0)
        opt.step()
    _mixed_grads(m, 1)
    before = _snapshot(opt)
    opt.grad_scale = torch.tensor(4.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    _assert_unchanged(opt, before)


def test_sparse_grad_scale_divides_like_unscaled_grads():
    """A valid grad_scale on the sparse path: the step of grads * s with grad_scale=s
    equals the step of the grads themselves (s a power of two: exact)."""
    ma, oa = _mixed_build("Adam", "sparse_first")()
    mb, ob = _mixed_build("Adam", "sparse_first")()
    for s in range(3):
        _mixed_grads(ma, s)
        _mixed_grads(mb, s)
        for p in ma.parameters():
            p.grad = p.grad * 8.0
        oa.grad_scale = torch.tensor(8.0)
        oa.found_inf = torch.tensor(0.0)
        oa.step()
        ob.step()
        assert _snapshot(oa) == _snapshot(ob)


def test_deepcopy_of_a_rejected_optimizer_steps_like_the_original():
    """The view caches filled while planning a rejected step stay valid."""
    ps, opt = _dense_build("Adam", False)()
    _dense_grads(ps, 0)
    opt.step()
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError):
        opt.step()
    opt.param_groups[1]["lr"] = 3e-3
    twin = copy.deepcopy(opt)
    for o in (opt, twin):
        _dense_grads(o.param_groups[0]["params"] + o.param_groups[1]["params"], 1)
        o.step()
    assert _snapshot(opt) == _snapshot(twin)
