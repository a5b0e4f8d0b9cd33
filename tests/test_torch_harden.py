"""fastadam.torch hardening: the view cache follows storage moves (``t.data = ...``),
non-tensor ``step`` values are converted as torch converts them, and
``load_state_dict`` checks everything before it changes anything."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fastadam import torch as fat  # noqa: E402

pytestmark = pytest.mark.torch


def _pair(cls, n=16, amsgrad=False, **kw):
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, generator=g))
    w2 = torch.nn.Parameter(w.detach().clone())
    a = getattr(fat, cls)([w], lr=1e-2, amsgrad=amsgrad, **kw)
    b = getattr(torch.optim, cls)([w2], lr=1e-2, amsgrad=amsgrad, fused=True, **kw)
    return (w, a), (w2, b)


def _grad(n, s):
    return torch.randn(n, generator=torch.Generator().manual_seed(50 + s))


# -- the view cache checks the storage of the cached state tensors ----------------------------

SWAPS = [(k, a) for k in ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "param"]
         for a in (False, True) if a or k != "max_exp_avg_sq"]


@pytest.mark.parametrize("key,amsgrad", SWAPS, ids=[k + "-amsgrad" * a for k, a in SWAPS])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_state_data_swap_follows_new_storage_like_torch(cls, key, amsgrad):
    """``state[k].data = new`` keeps the tensor object but moves its storage: the
    next steps must update the new storage, bitwise as torch's fused Adam."""
    n = 24
    (w, a), (w2, b) = _pair(cls, n, amsgrad)
    for s in range(4):
        w.grad = _grad(n, s)
        w2.grad = w.grad.clone()
        a.step()
        b.step()
        if s == 1:
            for p, o in ((w, a), (w2, b)):
                if key == "param":
                    p.data = torch.full((n,), 0.5)
                elif key == "step":
                    o.state[p]["step"].data = torch.tensor(7.0)
                else:
                    o.state[p][key].data = torch.full((n,), 0.25)
        assert torch.equal(w, w2), f"step {s}"
        for k, t in b.state[w2].items():
            assert torch.equal(a.state[w][k], t), f"state {k!r} after step {s}"


@pytest.mark.parametrize("key", ["exp_avg", "exp_avg_sq"])
def test_sparse_adam_state_data_swap_follows_new_storage(key):
    """SparseAdam: ``state[k].data = new`` steps exactly like replacing the tensor
    (which the cache sees) and near torch.optim.SparseAdam."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(10, 8, generator=g)
    ws = [torch.nn.Parameter(base.clone()) for _ in range(3)]
    opts = [fat.SparseAdam([ws[0]]), fat.SparseAdam([ws[1]]), torch.optim.SparseAdam([ws[2]])]
    for s in range(4):
        ids = torch.tensor([[s % 10, 3, 7]])
        vals = torch.randn(3, 8, generator=torch.Generator().manual_seed(s))
        for w, o in zip(ws, opts):
            w.grad = torch.sparse_coo_tensor(ids, vals, (10, 8), check_invariants=False)
            o.step()
        if s == 1:
            opts[0].state[ws[0]][key].data = torch.full((10, 8), 0.5)
            opts[1].state[ws[1]][key] = torch.full((10, 8), 0.5)
            opts[2].state[ws[2]][key].data = torch.full((10, 8), 0.5)
    assert torch.equal(ws[0], ws[1])
    assert torch.equal(opts[0].state[ws[0]][key], opts[1].state[ws[1]][key])
    torch.testing.assert_close(ws[0], ws[2], rtol=1e-6, atol=1e-7)


# -- non-tensor steps -------------------------------------------------------------------------

STEPS = [3, 3.0, np.int64(3), np.float32(3.0), torch.tensor(3), torch.tensor(3, dtype=torch.int32),
         torch.tensor(3.0, dtype=torch.float64), torch.tensor([3.0])]
STEP_IDS = ["int", "float", "np.int64", "np.float32", "tensor_int64", "tensor_int32",
            "tensor_f64", "tensor_1elem"]


@pytest.mark.parametrize("how", ["assigned", "loaded", "loaded_no_foreach"])
@pytest.mark.parametrize("step", STEPS, ids=STEP_IDS)
def test_adam_non_tensor_step_is_converted_like_torch(step, how):
    """An int/float/numpy/integer-tensor step (assigned, or in a loaded dict, also one
    whose group lacks 'foreach') steps on as torch does: from step 3 to 4."""
    n = 16
    (w, a), (w2, b) = _pair("Adam", n)
    for p, o in ((w, a), (w2, b)):
        p.grad = _grad(n, 0)
        o.step()
        st = copy.deepcopy(step)
        if how == "assigned":   # torch.optim itself needs a float tensor here
            o.state[p]["step"] = st if o is a else torch.tensor(3.0)
        else:
            sd = o.state_dict()
            sd["state"][0]["step"] = st
            if how == "loaded_no_foreach":
                del sd["param_groups"][0]["foreach"]
            o.load_state_dict(sd)
    if how != "assigned":
        assert isinstance(a.state[w]["step"], torch.Tensor)
    for p, o in ((w, a), (w2, b)):
        p.grad = _grad(n, 1)
        o.step()
    assert float(a.state[w]["step"]) == 4.0
    assert torch.equal(w, w2)
    assert torch.equal(a.state[w]["exp_avg_sq"], b.state[w2]["exp_avg_sq"])


@pytest.mark.parametrize("step", STEPS, ids=STEP_IDS)
def test_sparse_adam_non_int_step_is_converted(step):
    w = torch.nn.Parameter(torch.zeros(10, 4))
    o = fat.SparseAdam([w])
    w.grad = torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 4), (10, 4),
                                            check_invariants=False)
    o.step()
    o.state[w]["step"] = copy.deepcopy(step)
    o.step()
    assert o.state[w]["step"] == 4 and type(o.state[w]["step"]) is int


@pytest.mark.parametrize("bad", [-1, 2.5, float("nan"), "3", torch.tensor([1.0, 2.0])],
                         ids=["negative", "fractional", "nan", "str", "two_elements"])
@pytest.mark.parametrize("cls", ["Adam", "SparseAdam"])
def test_bad_assigned_step_raises_naming_it_and_writes_nothing(cls, bad):
    w = torch.nn.Parameter(torch.zeros(10, 4))
    o = getattr(fat, cls)([w])
    sparse = cls == "SparseAdam"

    def grad():
        return (torch.sparse_coo_tensor(torch.tensor([[1, 2]]), torch.ones(2, 4), (10, 4),
                                            check_invariants=False)
                if sparse else torch.ones(10, 4))
    w.grad = grad()
    o.step()
    o.state[w]["step"] = bad
    before = [w.detach().clone()] + [o.state[w][k].clone() for k in ("exp_avg", "exp_avg_sq")]
    w.grad = grad()
    with pytest.raises((TypeError, ValueError), match="step"):
        o.step()
    after = [w.detach()] + [o.state[w][k] for k in ("exp_avg", "exp_avg_sq")]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


# -- load_state_dict: checked before anything changes ---------------------------------------

def _trained(cls, amsgrad=False):
    """An optimizer with two groups (a 2-D and a 1-D param), stepped twice."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(6, 4, generator=g)),
          torch.nn.Parameter(torch.randn(8, generator=g))]
    if cls == "SparseAdam":
        o = fat.SparseAdam([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 3e-3}], lr=1e-2)
    else:
        o = getattr(fat, cls)([{"params": [ps[0]]}, {"params": [ps[1]], "lr": 3e-3}], lr=1e-2,
                              amsgrad=amsgrad)
    for s in range(2):
        for p in ps:
            if cls == "SparseAdam":
                n = p.shape[0]
                p.grad = torch.sparse_coo_tensor(torch.tensor([[0, s + 1, n - 1]]),
                                                 torch.randn((3,) + p.shape[1:], generator=g),
                                                 p.shape, check_invariants=False)
            else:
                p.grad = torch.randn(p.shape, generator=g)
        o.step()
    return ps, o


def _snap(ps, o):
    def b(x):
        if isinstance(x, torch.Tensor):
            return ("T", x.dtype, tuple(x.shape), x.detach().contiguous().numpy().tobytes())
        return (type(x), x)
    groups = [{k: (v if k != "params" else [id(p) for p in v]) for k, v in g.items()}
              for g in o.param_groups]
    return ([b(p) for p in ps], {id(p): {k: b(v) for k, v in st.items()}
                                 for p, st in o.state.items()}, repr(groups))


def _set(path, value):
    def f(sd):
        d = sd
        for k in path[:-1]:
            d = d[k]
        if value is _DEL:
            del d[path[-1]]
        else:
            d[path[-1]] = value(d[path[-1]]) if callable(value) else value
    return f


_DEL = object()
# (name, spoil(state_dict), message)
BAD_LOADS = [
    ("no_state", _set(["state"], _DEL), "lacks"),
    ("no_param_groups", _set(["param_groups"], _DEL), "lacks"),
    ("not_a_dict", None, "must be a dict"),
    ("one_group_fewer", _set(["param_groups"], lambda gs: gs[:1]), "number of parameter groups"),
    ("group_size", _set(["param_groups", 1, "params"], lambda ps: ps + [7]),
     "doesn't match the size"),
    ("bad_lr_later_group", _set(["param_groups", 1, "lr"], -1.0), "param group 1.*lr"),
    ("bad_beta", _set(["param_groups", 1, "betas"], (1.0, 0.9)), r"betas\[0\]"),
    ("lr_missing", _set(["param_groups", 1, "lr"], _DEL), "lacks"),
    ("maximize_not_bool", _set(["param_groups", 1, "maximize"], "yes"), "maximize"),
    ("state_key_unknown", _set(["state", 9], {}), "state key 9"),
    ("exp_avg_missing", _set(["state", 1, "exp_avg"], _DEL), "lacks 'exp_avg'"),
    ("unknown_state_key", _set(["state", 1, "momentum_buffer"], torch.zeros(8)), "unknown keys"),
    ("shape_later_param", _set(["state", 1, "exp_avg_sq"], torch.zeros(9)), "shape"),
    ("shape_first_param", _set(["state", 0, "exp_avg"], torch.zeros(4, 6)), "shape"),
    ("int_dtype", _set(["state", 1, "exp_avg"], torch.zeros(8, dtype=torch.int64)), "dtype"),
    ("complex_dtype", _set(["state", 1, "exp_avg"], torch.zeros(8, dtype=torch.complex64)),
     "dtype"),
    ("meta_device", _set(["state", 1, "exp_avg_sq"], torch.zeros(8, device="meta")), "meta"),
    ("numpy_shape", _set(["state", 1, "exp_avg"], np.zeros(9, np.float32)), "shape"),
    ("step_negative", _set(["state", 1, "step"], -1), "step"),
    ("step_fractional", _set(["state", 1, "step"], 2.5), "step"),
    ("step_two_elements", _set(["state", 1, "step"], torch.tensor([1.0, 2.0])), "step"),
    ("step_missing", _set(["state", 1, "step"], _DEL), "lacks 'step'"),
]


@pytest.mark.parametrize("name,spoil,match", BAD_LOADS, ids=[b[0] for b in BAD_LOADS])
@pytest.mark.parametrize("cls", ["Adam", "AdamW", "SparseAdam"])
def test_bad_load_state_dict_changes_nothing(cls, name, spoil, match):
    if cls == "SparseAdam" and name == "maximize_not_bool":
        pass   # SparseAdam groups have 'maximize' too
    ps, o = _trained(cls)
    _, donor = _trained(cls)
    sd = copy.deepcopy(donor.state_dict())
    if cls == "SparseAdam" and name in ("shape_first_param",):
        sd["state"][0]["exp_avg"] = torch.zeros(4, 6)
    elif spoil is None:
        sd = [sd]
    else:
        spoil(sd)
    before = _snap(ps, o)
    with pytest.raises((ValueError, TypeError), match=match):
        o.load_state_dict(sd)
    assert _snap(ps, o) == before
    # and the optimizer still steps like an untouched twin
    ps2, twin = _trained(cls)
    for qs, opt in ((ps, o), (ps2, twin)):
        for p in qs:
            p.grad = (torch.ones(p.shape) if cls != "SparseAdam" else
                      torch.sparse_coo_tensor(torch.tensor([[0]]), torch.ones((1,) + p.shape[1:]),
                                              p.shape, check_invariants=False))
        opt.step()
    assert _snap(ps, o)[0] == _snap(ps2, twin)[0]


@pytest.mark.parametrize("cls", ["Adam", "AdamW", "SparseAdam"])
def test_good_load_state_dict_still_loads_and_casts_like_torch(cls):
    """A float64 checkpoint for float32 params is cast (torch's rule), pre-hooks run
    once, post-hooks run."""
    ps, o = _trained(cls)
    _, donor = _trained(cls)
    sd = copy.deepcopy(donor.state_dict())
    for st in sd["state"].values():
        st["exp_avg"] = st["exp_avg"].double()
    calls = []
    o.register_load_state_dict_pre_hook(lambda opt, d: calls.append("pre"))
    o.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    o.load_state_dict(sd)
    assert calls == ["pre", "post"]
    for p in ps:
        assert o.state[p]["exp_avg"].dtype == torch.float32


def test_pre_hook_may_repair_the_dict_before_the_checks():
    ps, o = _trained("Adam")
    sd = copy.deepcopy(_trained("Adam")[1].state_dict())
    sd["state"][1]["exp_avg"] = torch.zeros(9)

    def fix(opt, d):
        d = copy.deepcopy(d)
        d["state"][1]["exp_avg"] = torch.zeros(8)
        return d
    o.register_load_state_dict_pre_hook(fix)
    o.load_state_dict(sd)
    assert torch.equal(o.state[ps[1]]["exp_avg"], torch.zeros(8))
