"""fastadam.torch with bfloat16/float16 parameters and bfloat16 state (issue 12):
bitwise torch fused on the same dtype, state_dtype=, stochastic rounding,
checkpoints that keep the state dtype and cross to and from torch."""
import os

import numpy as np
import pytest
from _options import TORCH, TORCH_SCALED

import fastadam as fa
from fastadam.torch import Adam, AdamW

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

SIZES = (1, 17, 256, 1000 + 3)


def _params(dt, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dt).requires_grad_() for n in SIZES]


def _grads(ps, t, scale=1.0):
    g = torch.Generator().manual_seed(100 + t)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in ps]


def _run(opt, ps, steps):
    """Step ``opt`` over ``ps`` with the gradients of ``steps``; returns ``opt``."""
    for t in steps:
        for p, g in zip(ps, _grads(ps, t)):
            p.grad = g
        opt.step()
    return opt


def _same(a, b):
    return torch.equal(a.detach().view(torch.int16) if a.dtype.itemsize == 2 else a.detach(),
                       b.detach().view(torch.int16) if b.dtype.itemsize == 2 else b.detach())


def _opts(o):
    cls, tcls = (AdamW, torch.optim.AdamW) if o.decoupled else (Adam, torch.optim.Adam)
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=o.weight_decay,
              amsgrad=o.amsgrad, maximize=o.maximize)
    return cls, tcls, kw


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("o", TORCH + TORCH_SCALED, ids=lambda o: o.id)
def test_bitwise_equal_to_torch_fused(dt, o):
    cls, tcls, kw = _opts(o)
    ours, theirs = _params(dt), _params(dt)
    opt, topt = cls(ours, **kw), tcls(theirs, fused=True, **kw)
    for t in range(1, 5):
        for p, q, g in zip(ours, theirs, _grads(ours, t, o.grad_scale or 1.0)):
            p.grad, q.grad = g.clone(), g.clone()
        for x in (opt, topt):
            if o.grad_scale:
                x.grad_scale = torch.tensor(o.grad_scale)
                x.found_inf = torch.tensor(0.0)
        opt.step()
        topt.step()
    for p, q in zip(ours, theirs):
        assert _same(p, q)
        for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if o.amsgrad else ()):
            assert _same(opt.state[p][k], topt.state[q][k]), k


def test_state_dtype_bf16_equals_the_numpy_optimizer():
    ps = _params(torch.float32)
    nps = [p.detach().numpy().copy() for p in ps]
    opt = AdamW(ps, lr=1e-2, amsgrad=True, state_dtype=torch.bfloat16)
    nopt = fa.AdamW(nps, lr=1e-2, amsgrad=True, state_dtype="bf16")
    for t in range(1, 4):
        gs = _grads(ps, t)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step()
        nopt.step([g.numpy() for g in gs])
    assert opt.param_groups[0]["state_dtype"] == "bfloat16"
    nsd = nopt.state_dict()["state"]
    for i, p in enumerate(ps):
        assert np.array_equal(p.detach().numpy(), nps[i])
        m = opt.state[p]["exp_avg"]
        assert m.dtype == torch.bfloat16
        assert np.array_equal(m.view(torch.int16).numpy(), nsd[i]["exp_avg"].view(np.int16))


def test_checkpoints_keep_the_state_dtype_and_cross_to_torch(tmp_path):
    ps = _params(torch.float32)
    opt = _run(Adam(ps, lr=1e-2, state_dtype="bf16"), ps, (1, 2))
    f = os.fspath(tmp_path / "c.npz")
    fa.save(opt.state_dict(), f)
    # back into fastadam.torch (numpy layout and torch layout): still bf16, same bits
    for sd in (fa.load(f), fa.load(f, as_torch=True)):
        qs = [p.detach().clone().requires_grad_() for p in ps]
        o2 = Adam(qs, lr=1e-2)
        o2.load_state_dict(sd)
        for p, q in zip(ps, qs):
            assert o2.state[q]["exp_avg_sq"].dtype == torch.bfloat16
            assert _same(o2.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    # into torch.optim (which casts state to the parameter dtype) and on
    qs = [p.detach().clone().requires_grad_() for p in ps]
    topt = torch.optim.Adam(qs, lr=1e-2, fused=True)
    topt.load_state_dict(fa.load(f, as_torch=True))
    for p, q in zip(ps, qs):
        assert torch.equal(topt.state[q]["exp_avg"], opt.state[p]["exp_avg"].float())
        q.grad = torch.ones_like(q)
    topt.step()


def test_bf16_checkpoint_from_torch_continues_bitwise(tmp_path):
    """torch.optim.Adam(fused) on bf16 params -> fastadam.save -> fastadam.torch
    continues exactly as torch would have."""
    ps, qs = _params(torch.bfloat16), _params(torch.bfloat16)
    topt = _run(torch.optim.Adam(ps, lr=1e-2, fused=True), ps, (1, 2))
    f = os.fspath(tmp_path / "t.npz")
    fa.save(topt.state_dict(), f)
    for q, p in zip(qs, ps):
        q.data.copy_(p.detach())
    opt = Adam(qs, lr=1e-2)
    opt.load_state_dict(fa.load(f))
    for t in (3, 4):
        gs = _grads(ps, t)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        topt.step()
        opt.step()
    for p, q in zip(ps, qs):
        assert _same(p, q)


def test_stochastic_rounding_seed_travels_and_resumes(tmp_path):
    full = _params(torch.bfloat16)
    half = _params(torch.bfloat16)
    o1 = Adam(full, lr=1e-3, stochastic_rounding=True, seed=9)
    o2 = Adam(half, lr=1e-3, stochastic_rounding=True, seed=9)
    for t in range(1, 5):
        for p, g in zip(full, _grads(full, t)):
            p.grad = g
        o1.step()
        if t <= 2:
            for p, g in zip(half, _grads(half, t)):
                p.grad = g
            o2.step()
    f = os.fspath(tmp_path / "sr.npz")
    fa.save(o2.state_dict(), f)
    resumed = [p.detach().clone().requires_grad_() for p in half]
    o3 = Adam(resumed, lr=1e-3, stochastic_rounding=True, seed=1)
    o3.load_state_dict(fa.load(f))
    assert o3.param_groups[0]["seed"] == 9
    for t in (3, 4):
        for p, g in zip(resumed, _grads(resumed, t)):
            p.grad = g
        o3.step()
    for p, q in zip(full, resumed):
        assert _same(p, q)
    # and it is not round-to-nearest
    rne = _params(torch.bfloat16)
    o4 = Adam(rne, lr=1e-3)
    for t in range(1, 5):
        for p, g in zip(rne, _grads(rne, t)):
            p.grad = g
        o4.step()
    assert not all(_same(p, q) for p, q in zip(full, rne))


def test_errors():
    with pytest.raises(TypeError, match="state_dtype float16 is not supported for float32"):
        p = torch.zeros(4, requires_grad=True)
        opt = Adam([p], state_dtype=torch.float16)
        p.grad = torch.ones(4)
        opt.step()
    with pytest.raises(TypeError, match="state_dtype 'int3' is not a known name"):
        Adam([torch.zeros(4, requires_grad=True)], state_dtype="int3")
    p = torch.zeros(4, requires_grad=True)
    opt = Adam([p], stochastic_rounding=True, seed=1)     # float32: nothing to round
    p.grad = torch.ones(4)
    with pytest.raises(TypeError, match="stochastic_rounding=True: no kernel"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(4))


def _np16(t):
    """numpy copy of a torch tensor (bfloat16 as ml_dtypes.bfloat16)."""
    import ml_dtypes
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
    return t.numpy().copy()


@pytest.mark.parametrize("which,pdt,sdt", [
    (w, torch.bfloat16, None) for w in ("Adam", "AdamW", "SparseAdam")] + [
    (w, torch.float32, "bfloat16") for w in ("Adam", "AdamW")],
    ids=["Adam-bf16", "AdamW-bf16", "SparseAdam-bf16", "Adam-f32-bf16state",
         "AdamW-f32-bf16state"])
def test_sparse_16bit_tables_equal_the_numpy_sparse_step(pdt, sdt, which):
    """bf16 embedding tables (bf16 state) and float32 tables with bf16 row state through
    the sparse parameters of fastadam.torch.Adam/AdamW: bitwise the numpy sparse step on
    the same rows (bf16 gradient rows widened to float32 exactly, as documented), over
    the recorded fast step too; untouched rows never change."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 12, sparse=True).to(pdt)
    from fastadam.torch import SparseAdam
    decoupled = which == "AdamW"
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    if which == "SparseAdam":   # torch's state: the table's dtype
        opt = SparseAdam(emb.parameters(), **kw)
    else:
        kw["weight_decay"] = 0.1
        opt = (AdamW if decoupled else Adam)(emb.parameters(), state_dtype=sdt, **kw)
    table = _np16(emb.weight)
    m = v = None
    touched = set()
    for t in range(1, 6):
        ids = torch.randint(0, 50, (20,))
        touched |= set(ids.tolist())
        opt.zero_grad()
        (emb(ids).float() * torch.linspace(-1, 1, 12)).square().sum().backward()
        g = emb.weight.grad
        gid, rows = g._indices()[0].numpy().copy(), g._values().detach().float().numpy().copy()
        opt.step()
        st = opt.state[emb.weight]
        if m is None:
            m, v = np.zeros_like(_np16(st["exp_avg"])), np.zeros_like(_np16(st["exp_avg_sq"]))
        fa.sparse_adam_step(table, gid, rows, m, v, step=t, decoupled_weight_decay=decoupled,
                            **kw)
        assert st["exp_avg"].dtype == (torch.bfloat16 if sdt else pdt)
        for ours, ref in ((emb.weight, table), (st["exp_avg"], m), (st["exp_avg_sq"], v)):
            assert np.array_equal(_np16(ours).view(np.uint8), ref.view(np.uint8)), t
    rest = sorted(set(range(50)) - touched)
    torch.manual_seed(0)
    w0 = torch.nn.Embedding(50, 12, sparse=True).to(pdt).weight
    assert _same(emb.weight[rest], w0[rest])


def test_sparse_float16_table_refused_before_any_write():
    emb = torch.nn.Embedding(10, 4, sparse=True).to(torch.float16)
    lin = torch.nn.Linear(4, 1)
    opt = Adam(list(emb.parameters()) + list(lin.parameters()), lr=0.1)
    lin(emb(torch.tensor([1, 2])).float()).sum().backward()
    before = [p.detach().clone() for p in (emb.weight, lin.weight, lin.bias)]
    with pytest.raises(TypeError, match="parameter 0 of param group 0 is float16 with a "
                                        "sparse gradient"):
        opt.step()
    assert all(_same(a, b) for a, b in zip(before, (emb.weight, lin.weight, lin.bias)))
    assert all(len(opt.state[p]) == 0 or int(opt.state[p]["step"]) == 0
               for p in (emb.weight, lin.weight, lin.bias))
