"""fastadam.torch drop-ins vs torch.optim (issue 6)."""
import copy
import inspect
import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastadam  # noqa: E402
import fastadam.functional  # noqa: E402
from fastadam import torch as fat  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import _torch_helpers as H  # noqa: E402


def _pair(cls_fa, cls_t, shapes, dtype=torch.float32, seed=0, groups=None, **kw):
    """Two copies of the same parameters with a fastadam and a torch optimizer."""
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    a = [torch.nn.Parameter(b.clone()) for b in base]
    b = [torch.nn.Parameter(x.clone()) for x in base]

    def mk(ps):
        if groups is None:
            return ps
        return [dict(params=[ps[i] for i in idx], **gkw) for idx, gkw in groups]

    tkw = dict(kw)
    tkw.setdefault("fused", True)
    return a, b, cls_fa(mk(a), **kw), cls_t(mk(b), **tkw)


def _set_grads(a, b, seed, none=()):
    g = torch.Generator().manual_seed(1000 + seed)
    for i, (x, y) in enumerate(zip(a, b)):
        if i in none:
            x.grad = y.grad = None
            continue
        gr = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x.grad = gr.clone()
        y.grad = gr.clone()


def _assert_bitwise(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"param {i}: max diff {(x - y).abs().max().item()}"


# -- basics ----------------------------------------------------------------------------------

def test_import_fastadam_does_not_import_torch():
    code = "import sys, fastadam; import fastadam.functional; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SparseAdam"])
def test_signature_and_defaults_match_torch(name):
    ours, theirs = getattr(fat, name), getattr(torch.optim, name)
    assert issubclass(ours, torch.optim.Optimizer)
    ps = inspect.signature(ours.__init__).parameters
    pt = inspect.signature(theirs.__init__).parameters
    for k, v in pt.items():
        assert k in ps, k
        assert ps[k].default == v.default, k
        assert ps[k].kind == v.kind, k
    p = torch.nn.Parameter(torch.zeros(3))
    assert ours([p]).defaults == theirs([p]).defaults
    # Adam/AdamW groups record fused=True (fastadam's arithmetic is torch fused's), so a
    # checkpoint keeps torch on its fused kernel; everything else is torch's.
    want = theirs([p], **({} if name == "SparseAdam" else {"fused": True}))
    assert ours([p]).state_dict()["param_groups"] == want.state_dict()["param_groups"]


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", [dict(), dict(amsgrad=True), dict(maximize=True),
                                  dict(weight_decay=0.1), dict(weight_decay=0.05, amsgrad=True,
                                                               maximize=True)])
def test_bitwise_vs_torch_fused(cls, dtype, opts):
    shapes = [(16, 8), (32,), (4, 4, 4), (48,)]
    groups = [([0, 1], dict(lr=3e-3)), ([2, 3], dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6))]
    a, b, oa, ob = _pair(getattr(fat, cls), getattr(torch.optim, cls), shapes, dtype,
                         groups=groups, **opts)
    for s in range(6):
        _set_grads(a, b, s, none=(1,) if s < 2 else ())  # grad None is skipped like torch
        oa.step()
        ob.step()
        _assert_bitwise(a, b)
    sa, sb = oa.state_dict(), ob.state_dict()
    assert sa["param_groups"] == sb["param_groups"]   # fused=True recorded, as torch's
    for i in sb["state"]:
        assert sa["state"][i].keys() == sb["state"][i].keys()
        for k in sb["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k]), (i, k)
            assert sa["state"][i][k].dtype == sb["state"][i][k].dtype
    assert float(sa["state"][1]["step"]) == 4.0  # skipped twice while grad was None


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_tolerance_vs_torch_single_tensor_odd_sizes(cls):
    shapes = [(7, 3), (1,), (33,), (5, 1, 2)]
    a, b, oa, ob = _pair(getattr(fat, cls), getattr(torch.optim, cls), shapes, lr=1e-2,
                         weight_decay=0.01, fused=None, foreach=False)
    for s in range(10):
        _set_grads(a, b, s)
        oa.step()
        ob.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_grad_none_is_skipped_and_creates_no_state():
    p, q = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = fat.Adam([p, q], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    assert q not in opt.state and torch.equal(q, torch.ones(4))
    assert float(opt.state[p]["step"]) == 1.0


def test_zero_copy_and_one_native_call_per_group(monkeypatch):
    """The first step plans each group once (the checked path); later steps take the
    recorded fast step: one native call per group, on the same memory."""
    calls = []
    real = fastadam.functional.plan_adam

    def spy(params, grads, *a, **k):
        calls.append(len(params))
        return real(params, grads, *a, **k)

    fast_calls = []
    real_run = fat._fast.Prepared.run

    def spy_run(self):
        fast_calls.append(len(self.calls))
        return real_run(self)

    monkeypatch.setattr(fastadam.functional, "plan_adam", spy)
    monkeypatch.setattr(fat._fast.Prepared, "run", spy_run)
    a = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 8), (16,), (3, 5), (32,)]]
    opt = fat.AdamW([{"params": a[:3]}, {"params": a[3:], "lr": 0.1}])
    ptrs = [p.data_ptr() for p in a]
    for _s in range(3):
        for p in a:
            p.grad = torch.randn_like(p)
        opt.step()
    assert calls == [3, 1]
    assert fast_calls == [1, 1] * 2
    assert [p.data_ptr() for p in a] == ptrs
    st = opt.state[a[0]]
    m_ptr, v_ptr = st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()
    opt.step()
    assert (st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()) == (m_ptr, v_ptr)


def test_n_threads_do_not_change_results():
    out = []
    for nt in (1, 2):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(70001))
        opt = fat.Adam([p], lr=1e-2, n_threads=nt)
        for s in range(3):
            p.grad = torch.sin(torch.arange(70001, dtype=torch.float32) * (s + 1))
            opt.step()
        out.append(p.detach().clone())
    assert torch.equal(out[0], out[1])


def test_closure_and_no_grad():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fat.Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == 5.0
    assert not w.grad.requires_grad
    assert torch.allclose(w.detach(), torch.tensor([0.9, -1.9]))


def test_complex_params_like_torch():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(16, dtype=torch.complex64, generator=g)
    a, b = torch.nn.Parameter(z.clone()), torch.nn.Parameter(z.clone())
    oa, ob = fat.AdamW([a], lr=1e-2), torch.optim.AdamW([b], lr=1e-2, foreach=False)
    for _s in range(5):
        gr = torch.randn(16, dtype=torch.complex64, generator=g)
        a.grad, b.grad = gr.clone(), gr.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- layouts -----------------------------------------------------------------------------------

def test_transposed_param_zero_copy_matches_contiguous():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 16, generator=g)
    pt = torch.nn.Parameter(base.clone().t())          # dense, permuted
    pc = torch.nn.Parameter(base.t().contiguous())     # same values, contiguous
    assert not pt.is_contiguous()
    ot, oc = fat.Adam([pt], lr=1e-2, amsgrad=True), fat.Adam([pc], lr=1e-2, amsgrad=True)
    ptr = pt.data_ptr()
    for s in range(4):
        gr = torch.randn(16, 32, generator=g)
        pt.grad = gr.clone()          # contiguous grad, different layout from pt: read copy
        if s % 2:
            pt.grad = torch.empty_like(pt).copy_(gr)   # same layout as pt: zero copy
        pc.grad = gr.clone()
        ot.step()
        oc.step()
    assert pt.data_ptr() == ptr and not pt.is_contiguous()
    assert torch.equal(pt, pc)
    assert ot.state[pt]["exp_avg"].stride() == pt.stride()


def test_gapped_view_param_copy_back():
    big = torch.randn(8, 10)
    keep = big.clone()
    p = torch.nn.Parameter(big[:, :6])   # a leaf sharing big's storage, with gaps
    q = torch.nn.Parameter(big[:, :6].contiguous())
    assert not p.is_contiguous()
    op, oq = fat.AdamW([p], lr=1e-2), fat.AdamW([q], lr=1e-2)
    for _s in range(3):
        gr = torch.randn(8, 6)
        p.grad, q.grad = gr.clone(), gr.clone()
        op.step()
        oq.step()
    assert torch.equal(p, q)
    assert torch.equal(big[:, 6:], keep[:, 6:])   # nothing outside the view is written
    assert torch.equal(big[:, :6], q.detach())


def test_state_relaid_after_loading_contiguous_state_for_transposed_param():
    base = torch.randn(16, 16)
    pt = torch.nn.Parameter(base.clone().t())
    pc = torch.nn.Parameter(base.t().contiguous())
    ot, oc = fat.Adam([pt], lr=1e-2), fat.Adam([pc], lr=1e-2)
    gr = torch.randn(16, 16)
    pc.grad = gr.clone()
    oc.step()
    pt.data.copy_(pc.detach())
    ot.load_state_dict(_roundtrip(oc.state_dict()))  # contiguous exp_avg, transposed param
    for _s in range(2):
        gr = torch.randn(16, 16)
        pt.grad, pc.grad = gr.clone(), gr.clone()
        ot.step()
        oc.step()
    assert torch.equal(pt, pc)


# -- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_accepted(dtype):
    """16-bit parameters are stepped (issue 12; parity: tests/test_torch_lowp.py)."""
    pytest.importorskip("ml_dtypes")
    p = torch.nn.Parameter(torch.zeros(4, dtype=dtype))
    for cls in (fat.Adam, fat.AdamW):
        opt = cls([p], lr=0.5)
        p.grad = torch.ones(4, dtype=dtype)
        opt.step()
        assert opt.state[p]["exp_avg"].dtype == dtype


def test_non_cpu_and_other_bad_params():
    meta = torch.nn.Parameter(torch.empty(4, device="meta"))
    opt = fat.Adam([meta])             # accepted when built (deferred init) ...
    meta.grad = torch.empty(4, device="meta")
    with pytest.raises(ValueError, match="parameter 0 of param group 0 is on device 'meta'.*"
                                         "CPU tensors only"):
        opt.step()                     # ... refused when stepped
    with pytest.raises(TypeError, match="float32/float64"):
        fat.Adam([torch.zeros(3, dtype=torch.int32)])
    p = torch.nn.Parameter(torch.zeros(4))
    opt = fat.Adam([p])
    p.data = torch.zeros(4, dtype=torch.float8_e5m2)  # changed after construction
    p.grad = torch.zeros(4, dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match="float8_e5m2"):
        opt.step()
    with pytest.raises(ValueError, match="capturable"):
        fat.Adam([torch.nn.Parameter(torch.zeros(2))], capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        fat.Adam([torch.nn.Parameter(torch.zeros(2))], differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fat.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta parameter at index 1"):
        fat.Adam([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))


def test_rejected_step_writes_nothing():
    a = torch.nn.Parameter(torch.ones(8))
    b = torch.nn.Parameter(torch.ones(2, 4, dtype=torch.float64))
    opt = fat.Adam([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.ones(8)
    b.data = torch.ones(2, 4, dtype=torch.float8_e5m2)   # group 1 turns invalid after construction
    b.grad = torch.ones(2, 4, dtype=torch.float8_e5m2)
    with pytest.raises(TypeError, match="float8_e5m2"):
        opt.step()
    assert torch.equal(a, torch.ones(8)) and float(opt.state[a]["step"]) == 0.0


def test_sparse_adam_errors_follow_torch():
    p = torch.nn.Parameter(torch.zeros(5, 3))
    opt = fat.SparseAdam([p])
    p.grad = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match="SparseAdam does not support dense gradients, "
                                           "please consider Adam instead"):
        opt.step()
    with pytest.raises(ValueError, match="SparseAdam requires dense parameter tensors"):
        fat.SparseAdam([torch.zeros(5, 3).to_sparse()])
    with pytest.raises(ValueError, match="does not support complex parameters"):
        fat.SparseAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        fat.SparseAdam([p], lr=0.0)
    with pytest.raises(ValueError, match="Invalid epsilon"):
        fat.SparseAdam([p], eps=0.0)


# -- schedulers, AMP ---------------------------------------------------------------------------

@pytest.mark.parametrize("sched", ["step", "onecycle", "lambda_tensor_lr"])
def test_lr_scheduler(sched):
    shapes = [(16, 16), (16,)]
    lr = torch.tensor(0.01) if sched == "lambda_tensor_lr" else 0.01
    a, b, oa, ob = _pair(fat.AdamW, torch.optim.AdamW, shapes, lr=lr)

    def mk(o):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        if sched == "onecycle":  # also cycles betas[0]
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10)
        return torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e))

    sa, sb = mk(oa), mk(ob)
    for s in range(8):
        _set_grads(a, b, s)
        oa.step()
        ob.step()
        sa.step()
        sb.step()
        assert _lr(oa) == _lr(ob)
        _assert_bitwise(a, b)
    assert _lr(oa) != 0.01
    assert sa.state_dict() == sb.state_dict()


def _lr(o):
    v = o.param_groups[0]["lr"]
    return float(v)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_matches_torch_fused_including_skipped_step(unscale_first):
    torch.manual_seed(0)
    ma = torch.nn.Linear(16, 16)
    mb = copy.deepcopy(ma)
    oa = fat.AdamW(ma.parameters(), lr=1e-2)
    ob = torch.optim.AdamW(mb.parameters(), lr=1e-2, fused=True)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(32, 16)
    for s in range(6):
        for m, o, sc in ((ma, oa, sa), (mb, ob, sb)):
            o.zero_grad()
            loss = m(x).pow(2).mean() * (float("inf") if s == 3 else 1.0)
            sc.scale(loss).backward()
            if unscale_first:   # e.g. to clip gradients before the step
                sc.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            sc.step(o)
            sc.update()
        assert sa.get_scale() == sb.get_scale()
        _assert_bitwise(list(ma.parameters()), list(mb.parameters()))
    assert sa.get_scale() < 2.0 ** 8  # the inf step was skipped and backed off
    assert float(oa.state[ma.weight]["step"]) == float(ob.state[mb.weight]["step"]) == 5.0


# -- checkpoints cross over --------------------------------------------------------------------

def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
@pytest.mark.parametrize("direction", ["torch_to_fastadam", "fastadam_to_torch"])
@pytest.mark.parametrize("torch_kw", [dict(fused=True), dict(foreach=False)])
def test_checkpoint_crosses_over(cls, direction, torch_kw):
    shapes = [(16, 16), (32,), (16, 3)]
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=0.02)
    FA, TO = getattr(fat, cls), getattr(torch.optim, cls)
    # Reference: the saving library trains 4 + 4 steps without interruption.
    a, b, oa, ob = _pair(FA, TO, shapes, **kw, **torch_kw)
    src_p, src_o = (b, ob) if direction == "torch_to_fastadam" else (a, oa)
    for s in range(4):
        _set_grads(a, b, s)
        src_o.step()
    sd = _roundtrip(src_o.state_dict())
    params = [torch.nn.Parameter(p.detach().clone()) for p in src_p]
    if direction == "torch_to_fastadam":
        dst = FA(params, **kw)
    else:
        dst = TO(params, **kw, **torch_kw)
    dst.load_state_dict(sd)
    for s in range(4, 8):
        _set_grads(src_p, params, s)
        src_o.step()
        dst.step()
    if "fused" in torch_kw:
        _assert_bitwise(params, src_p)
    else:
        for x, y in zip(params, src_p):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    steps = [float(st["step"]) for st in dst.state_dict()["state"].values()]
    assert steps == [8.0] * len(shapes)


@pytest.mark.parametrize("direction", ["torch_to_fastadam", "fastadam_to_torch"])
def test_sparse_adam_checkpoint_crosses_over(direction):
    torch.manual_seed(0)
    ea = torch.nn.Embedding(50, 16, sparse=True)
    eb = copy.deepcopy(ea)
    oa, ob = fat.SparseAdam(ea.parameters(), lr=1e-2), torch.optim.SparseAdam(eb.parameters(),
                                                                              lr=1e-2)
    src_m, src_o, dst_m = (eb, ob, ea) if direction == "torch_to_fastadam" else (ea, oa, eb)
    dst_o = oa if src_o is ob else ob
    ids = [torch.randint(0, 50, (20,)) for _ in range(8)]
    for s in range(4):
        src_o.zero_grad()
        src_m(ids[s]).sum().backward()
        src_o.step()
    dst_m.weight.data.copy_(src_m.weight.detach())
    dst_o.load_state_dict(_roundtrip(src_o.state_dict()))
    for s in range(4, 8):
        for m, o in ((src_m, src_o), (dst_m, dst_o)):
            o.zero_grad()
            (m(ids[s]) * torch.arange(16.0)).sum().backward()
            o.step()
    torch.testing.assert_close(ea.weight, eb.weight, rtol=1e-6, atol=1e-7)
    assert oa.state_dict()["state"][0]["step"] == ob.state_dict()["state"][0]["step"] == 8


# -- sparse ------------------------------------------------------------------------------------

def test_sparse_adam_matches_torch():
    torch.manual_seed(0)
    ea = torch.nn.Embedding(100, 24, sparse=True)
    eb = copy.deepcopy(ea)
    before = ea.weight.detach().clone()
    oa = fat.SparseAdam(ea.parameters(), lr=5e-3, betas=(0.8, 0.99), eps=1e-6, maximize=True)
    ob = torch.optim.SparseAdam(eb.parameters(), lr=5e-3, betas=(0.8, 0.99), eps=1e-6,
                                maximize=True)
    touched = set()
    for _s in range(8):
        ids = torch.randint(0, 60, (30,))   # duplicates; rows >= 60 never touched
        touched.update(ids.tolist())
        w = torch.randn(30, 24)
        for e, o in ((ea, oa), (eb, ob)):
            o.zero_grad()
            (e(ids) * w).sum().backward()
            o.step()
    # an empty batch still counts a step, like torch
    for e, o in ((ea, oa), (eb, ob)):
        o.zero_grad()
        e(torch.zeros(0, dtype=torch.long)).sum().backward()
        o.step()
    torch.testing.assert_close(ea.weight, eb.weight, rtol=1e-6, atol=1e-7)
    untouched = sorted(set(range(100)) - touched)
    assert torch.equal(ea.weight[untouched], before[untouched])
    assert oa.state[ea.weight]["step"] == ob.state[eb.weight]["step"] == 9


class _Bag(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(64, 16, sparse=True)
        self.lin = torch.nn.Linear(16, 4)

    def forward(self, ids):
        return self.lin(self.emb(ids).mean(1))


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_mixed_dense_and_sparse_params_in_one_optimizer(cls):
    """One fastadam Adam == torch Adam(dense, fused) + torch SparseAdam(embedding)."""
    torch.manual_seed(0)
    ma = _Bag()
    mb = copy.deepcopy(ma)
    before = ma.emb.weight.detach().clone()
    oa = getattr(fat, cls)(ma.parameters(), lr=1e-2, weight_decay=0.0)
    od = getattr(torch.optim, cls)(mb.lin.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    os_ = torch.optim.SparseAdam(mb.emb.parameters(), lr=1e-2)
    touched = set()
    for s in range(6):
        ids = torch.randint(0, 40, (8, 5))
        y = torch.randint(0, 4, (8,))
        touched.update(ids.flatten().tolist())
        oa.zero_grad()
        od.zero_grad()
        os_.zero_grad()
        torch.nn.functional.cross_entropy(ma(ids), y).backward()
        torch.nn.functional.cross_entropy(mb(ids), y).backward()
        assert ma.emb.weight.grad.is_sparse
        oa.step()
        od.step()
        os_.step()
        if s == 0:   # identical inputs: the dense step is torch fused's, bit for bit
            _assert_bitwise(list(ma.lin.parameters()), list(mb.lin.parameters()))
        for x, y in zip(ma.lin.parameters(), mb.lin.parameters()):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ma.emb.weight, mb.emb.weight, rtol=1e-6, atol=1e-7)
    untouched = sorted(set(range(64)) - touched)
    assert torch.equal(ma.emb.weight[untouched], before[untouched])
    st = oa.state[ma.emb.weight]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and float(st["step"]) == 6.0


def test_mixed_sparse_weight_decay_touches_only_present_rows():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    before = emb.weight.detach().clone()
    opt = fat.AdamW(emb.parameters(), lr=0.1, weight_decay=0.5)
    emb(torch.tensor([1, 1, 3])).sum().backward()
    opt.step()
    changed = (emb.weight != before).any(1).nonzero().flatten().tolist()
    assert changed == [1, 3]


def test_adam_plain_torch_rejects_sparse_but_ours_accepts():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([2])).sum().backward()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        torch.optim.Adam(emb.parameters()).step()
    fat.Adam(emb.parameters()).step()


# -- real models -------------------------------------------------------------------------------

def _train(model_fn, data_fn, opt_fn, steps):
    torch.manual_seed(0)
    model = model_fn()
    opt = opt_fn(model.parameters())
    losses = []
    for s in range(steps):
        x, y = data_fn(s)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()]


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
                               torch.nn.ReLU(), torch.nn.Linear(64, 16))


def _mlp_data(s):
    g = torch.Generator().manual_seed(s)
    x = torch.randn(64, 32, generator=g)
    return x, x[:, :16].argmax(1)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(32, 32)
        self.enc = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0,
                                                    batch_first=True)
        self.head = torch.nn.Linear(32, 32)

    def forward(self, x):
        return self.head(self.enc(self.emb(x))).flatten(0, 1)


def _block_data(s):
    g = torch.Generator().manual_seed(s)
    x = torch.randint(0, 32, (8, 16), generator=g)
    return x, torch.roll(x, 1, dims=1).flatten()


@pytest.mark.parametrize("model", ["mlp", "transformer"])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_real_models_match_torch(model, cls):
    mf, df = (_mlp, _mlp_data) if model == "mlp" else (_Block, _block_data)
    steps = 25
    kw = dict(lr=3e-3, weight_decay=0.01)
    la, pa = _train(mf, df, lambda ps: getattr(fat, cls)(ps, **kw), steps)
    lb, pb = _train(mf, df, lambda ps: getattr(torch.optim, cls)(ps, fused=True, **kw), steps)
    lc, pc = _train(mf, df, lambda ps: getattr(torch.optim, cls)(ps, **kw), steps)
    assert la == lb                          # bitwise: the same arithmetic as torch fused
    _assert_bitwise(pa, pb)
    # torch's default (foreach) path: not correctly rounded sqrt, so tolerance. Parameters
    # whose gradient is exactly zero up to rounding noise (the attention key bias) take
    # +-lr steps driven by that noise in every implementation, hence the loose atol.
    np.testing.assert_allclose(la, lc, rtol=1e-5)
    for x, y in zip(pa, pc):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=2e-3)
    assert la[-1] < la[0]


# -- distributed -------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_ddp_and_zero_redundancy_optimizer(tmp_path):
    steps = 5
    port = H.free_port()
    ctx = torch.multiprocessing.spawn(H.ddp_worker, args=(2, port, steps, str(tmp_path)),
                                      nprocs=2, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("DDP workers did not finish within 90 s")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    single = H.train_single(steps)
    for mode in ("ddp", "zero"):
        for x, y, z in zip(r0[mode], r1[mode], single):
            assert torch.equal(x, y)             # ranks agree exactly
            torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)
    for x, y in zip(r0["ddp"], r0["zero"]):      # ZeRO's sharded step == plain step, bitwise
        assert torch.equal(x, y)
    assert r0["zero_state_steps"] == [float(steps)] * 4
    mixed = H.train_single_mixed(steps)   # sparse embedding grads all-reduced by gloo
    for x, y, z in zip(r0["mixed"], r1["mixed"], mixed):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_step_bumps_autograd_version_like_torch():
    """Modifying a parameter that a pending backward still needs raises, as with torch."""
    for cls in (fat.Adam, torch.optim.Adam):
        w = torch.nn.Parameter(torch.ones(4))
        opt = cls([w], lr=0.1)
        w.grad = torch.ones(4)
        loss = (w * w).sum()       # saves w for backward
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_cached_views_follow_changes_between_steps():
    """Replacing p.data or a state tensor, and load_state_dict, between steps."""
    a = [torch.nn.Parameter(torch.randn(16)) for _ in range(2)]
    b = [torch.nn.Parameter(x.detach().clone()) for x in a]
    oa = fat.Adam(a, lr=1e-2)
    ob = torch.optim.Adam(b, lr=1e-2, fused=True)
    for s in range(8):
        _set_grads(a, b, s)
        if s == 4:
            new = torch.randn(16)
            a[0].data = new.clone()
            b[0].data = new.clone()
        if s == 5:
            for o in (oa, ob):
                o.state[o.param_groups[0]["params"][1]]["exp_avg"] = torch.ones(16)
        if s == 6:
            oa.load_state_dict(_roundtrip(ob.state_dict()))
        oa.step()
        ob.step()
        _assert_bitwise(a, b)


def test_sparse_cached_views_follow_changes_between_steps():
    """SparseAdam reuses its numpy views from the second step on; replacing
    p.data or a state tensor, load_state_dict, a gradient of another kind
    (hybrid sparse, then dense dims flattened) all take effect."""
    torch.manual_seed(1)
    ea = torch.nn.Embedding(40, 8, sparse=True)
    eb = copy.deepcopy(ea)
    oa = fat.SparseAdam(ea.parameters(), lr=1e-2)
    ob = torch.optim.SparseAdam(eb.parameters(), lr=1e-2)
    for s in range(9):
        ids = torch.randint(0, 40, (25,))
        w = torch.randn(25, 8)
        if s == 3:
            new = torch.randn(40, 8)
            ea.weight.data = new.clone()
            eb.weight.data = new.clone()
        if s == 4:
            for o, e in ((oa, ea), (ob, eb)):
                o.state[e.weight]["exp_avg"] = torch.full((40, 8), 0.01)
        if s == 5:
            oa.load_state_dict(_roundtrip(ob.state_dict()))
        for e, o in ((ea, oa), (eb, ob)):
            o.zero_grad()
            (e(ids) * w).sum().backward()
            if s == 6:   # the same rows as a coalesced gradient built by hand
                e.weight.grad = e.weight.grad.coalesce()
            o.step()
        torch.testing.assert_close(ea.weight, eb.weight, rtol=1e-6, atol=1e-7)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(oa.state[ea.weight][k], ob.state[eb.weight][k],
                                       rtol=1e-5, atol=1e-7)
    assert oa.state[ea.weight]["step"] == ob.state[eb.weight]["step"] == 9


def test_sparse_adam_rejected_step_on_cached_views_writes_nothing():
    """From the second step SparseAdam takes its cached-view path; a gradient with
    an out-of-range row id is still rejected before anything is written."""
    e = torch.nn.Embedding(30, 4, sparse=True)
    opt = fat.SparseAdam(e.parameters(), lr=1e-2)
    for ids in (torch.tensor([1, 5, 1]), torch.tensor([2, 7])):
        opt.zero_grad()
        e(ids).sum().backward()
        opt.step()
    st = opt.state[e.weight]
    before = [t.detach().clone() for t in (e.weight, st["exp_avg"], st["exp_avg_sq"])]
    e.weight.grad = torch.sparse_coo_tensor(torch.tensor([[3, 30]]), torch.ones(2, 4),
                                            (30, 4), check_invariants=False)
    with pytest.raises(IndexError, match=r"indices\[1\] = 30"):
        opt.step()
    after = (e.weight, st["exp_avg"], st["exp_avg_sq"])
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(after, before))
    assert st["step"] == 2 and e.weight in opt._fa_views


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_adam_bad_id_in_a_later_group_on_cached_views_writes_nothing(dtype):
    """Two tables in two groups, both on the by-address fast path (third step); a bad
    id in the SECOND group's gradient is rejected and neither table, nor any state
    value, nor any step count changes."""
    torch.manual_seed(3)
    ea = torch.nn.Embedding(30, 4, sparse=True).to(dtype)
    eb = torch.nn.Embedding(20, 8, sparse=True).to(dtype)
    opt = fat.SparseAdam([{"params": ea.parameters()}, {"params": eb.parameters(), "lr": 0.05}],
                         lr=1e-2)
    for ids in (torch.tensor([1, 5, 1]), torch.tensor([2, 7]), torch.tensor([0, 3, 3])):
        opt.zero_grad()
        (ea(ids).sum() + eb(ids).sum()).backward()
        opt.step()
    assert ea.weight in opt._fa_views and eb.weight in opt._fa_views
    bufs = [t for e in (ea, eb) for t in (e.weight, opt.state[e.weight]["exp_avg"],
                                          opt.state[e.weight]["exp_avg_sq"])]
    before = [t.detach().clone() for t in bufs]
    opt.zero_grad()
    ea(torch.tensor([4, 6])).sum().backward()           # a good gradient in group 0
    eb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[3, 20]]), torch.ones(2, 8, dtype=dtype),
                                             (20, 8), check_invariants=False)
    with pytest.raises(IndexError, match=r"indices\[1\] = 20"):
        opt.step()
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(bufs, before))
    assert opt.state[ea.weight]["step"] == opt.state[eb.weight]["step"] == 3


def test_amsgrad_switched_on_later_creates_its_state():
    p = torch.nn.Parameter(torch.randn(16))
    opt = fat.Adam([p], lr=1e-2)
    p.grad = torch.randn(16)
    opt.step()
    opt.param_groups[0]["amsgrad"] = True   # torch raises KeyError here; we create the state
    opt.step()
    st = opt.state[p]
    assert torch.equal(st["max_exp_avg_sq"], st["exp_avg_sq"])
    opt.param_groups[0]["amsgrad"] = False
    opt.step()
    assert float(st["step"]) == 3.0


def test_bad_sparse_grad_in_second_group_writes_nothing():
    dense = torch.nn.Parameter(torch.ones(16))
    emb = torch.nn.Parameter(torch.ones(2, 4).t())   # a transposed table
    opt = fat.Adam([{"params": [dense]}, {"params": [emb]}], lr=0.1)
    dense.grad = torch.ones(16)
    emb.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.ones(1, 2), (4, 2),
                                       check_invariants=True)
    with pytest.raises(ValueError, match="must be contiguous"):
        opt.step()
    assert torch.equal(dense, torch.ones(16)) and torch.equal(emb, torch.ones(4, 2))


def test_pickle_and_deepcopy_keep_working():
    import pickle
    p = torch.nn.Parameter(torch.randn(32))
    opt = fat.AdamW([p], lr=1e-2, n_threads=1)
    p.grad = torch.randn(32)
    opt.step()
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        q = clone.param_groups[0]["params"][0]
        assert q is not p and torch.equal(q, p)
        q.grad = p.grad.clone()
        before = p.detach().clone()
        clone.step()
        assert not torch.equal(q, before) and torch.equal(p, before)
        assert float(clone.state[q]["step"]) == 2.0 and float(opt.state[p]["step"]) == 1.0
        assert clone.n_threads == 1
