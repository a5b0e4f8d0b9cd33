"""fastadam.torch's recorded fast step (fastadam/torch/_fast.py) and step entry
(fastadam/torch/_stepper.py): every change between steps that the checked path
would see is seen, results stay bitwise torch fused's, hooks/profiler/lock work."""
import threading

import pytest

torch = pytest.importorskip("torch")

from fastadam import torch as fat  # noqa: E402


def _bits(t):
    return t.detach().clone().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _pair(shapes=((8, 8), (16,), (3, 5)), seed=0, **kw):
    """The same parameters under fastadam.torch.AdamW and torch fused AdamW."""
    torch.manual_seed(seed)
    base = [torch.randn(s) for s in shapes]
    a = [torch.nn.Parameter(b.clone()) for b in base]
    b = [torch.nn.Parameter(t.clone()) for t in base]
    return a, fat.AdamW(a, lr=1e-2, **kw), b, torch.optim.AdamW(b, lr=1e-2, fused=True, **kw)


def _grads(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    for p, q in zip(a, b):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()


def _same(a, b):
    return all(torch.equal(_bits(p), _bits(q)) for p, q in zip(a, b))


def _fast_used(opt):
    return all(r is not None for r in opt._fa_fast.values()) and opt._fa_fast


@pytest.mark.parametrize("amsgrad", [False, True])
def test_fast_steps_bitwise_torch_fused_with_a_scheduler(amsgrad):
    a, opt, b, ref = _pair(amsgrad=amsgrad)
    sa = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for s in range(6):
        _grads(a, b, s)
        opt.step()
        ref.step()
        sa.step()
        sb.step()
        assert _same(a, b), s
    assert _fast_used(opt)
    for p, q in zip(a, b):
        for k in ref.state[q]:
            assert torch.equal(opt.state[p][k], ref.state[q][k]), k


SWAPS = {
    "p.data": lambda opt, p: setattr(p, "data", p.data.clone()),
    "state tensor replaced": lambda opt, p: opt.state[p].__setitem__(
        "exp_avg", opt.state[p]["exp_avg"].clone()),
    "state .data": lambda opt, p: setattr(opt.state[p]["exp_avg_sq"], "data",
                                          opt.state[p]["exp_avg_sq"].clone()),
    "step .data": lambda opt, p: setattr(opt.state[p]["step"], "data",
                                         opt.state[p]["step"].clone()),
    "state dict replaced": lambda opt, p: opt.state.__setitem__(
        p, {k: v.clone() for k, v in opt.state[p].items()}),
    "step set in place": lambda opt, p: opt.state[p]["step"].fill_(7.0),
    "step an int": lambda opt, p: opt.state[p].__setitem__(     # torch's own wants a tensor
        "step", 2 if isinstance(opt, fat.Adam) else torch.tensor(2.0)),
    "params list entry": None,
}


@pytest.mark.parametrize("what", list(SWAPS))
def test_swapped_tensors_between_steps_are_followed(what):
    """After each change the step updates the tensors that are there now, as torch."""
    a, opt, b, ref = _pair()
    for s in range(2):
        _grads(a, b, s)
        opt.step()
        ref.step()
    if what == "params list entry":
        new_a, new_b = (torch.nn.Parameter(torch.ones(16)) for _ in range(2))
        opt.param_groups[0]["params"][1] = new_a
        ref.param_groups[0]["params"][1] = new_b
        a[1], b[1] = new_a, new_b
    else:
        for o, ps in ((opt, a), (ref, b)):
            SWAPS[what](o, ps[1])
    for s in range(2, 4):
        _grads(a, b, s)
        opt.step()
        ref.step()
        assert _same(a, b), s
        for p, q in zip(a, b):
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(opt.state[p][k], ref.state[q][k]), (s, k)
    assert _fast_used(opt)


def test_grad_appearing_disappearing_and_sparse_are_followed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 3))
    ref_model = torch.nn.Sequential(torch.nn.Embedding(20, 4), torch.nn.Linear(4, 3))
    ref_model.load_state_dict(model.state_dict())
    opt = fat.Adam(model.parameters(), lr=1e-2)
    ref = torch.optim.Adam(ref_model.parameters(), lr=1e-2, fused=True)
    ids = torch.tensor([1, 3, 3, 7])
    for s in range(5):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            m[0].weight.requires_grad_(s not in (2, 3))   # frozen for two steps
            m(ids).sum().backward()
            o.step()
        assert _same(model.parameters(), ref_model.parameters()), s
    assert opt.state[model[0].weight]["step"] == 3


def test_hyperparameters_changed_or_bad_between_steps():
    a, opt, b, ref = _pair()
    _grads(a, b, 0)
    opt.step()
    ref.step()
    for o in (opt, ref):
        o.param_groups[0].update(lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-6,
                                 maximize=True)
    _grads(a, b, 1)
    opt.step()
    ref.step()
    assert _same(a, b)
    opt.param_groups[0]["lr"] = torch.tensor(5e-3)   # a tensor lr, changed in place below
    ref.param_groups[0]["lr"] = 5e-3
    for s, lr in ((2, 5e-3), (3, 1e-3)):
        opt.param_groups[0]["lr"].fill_(lr)
        ref.param_groups[0]["lr"] = lr
        _grads(a, b, s)
        opt.step()
        ref.step()
        assert _same(a, b), s
    before = [_bits(p) for p in a] + [_bits(opt.state[p]["exp_avg"]) for p in a]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    after = [_bits(p) for p in a] + [_bits(opt.state[p]["exp_avg"]) for p in a]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert all(float(opt.state[p]["step"]) == 4 for p in a)


def test_rejected_step_on_the_fast_path_writes_nothing():
    """A grad aliasing a parameter or of the wrong dtype, one group bad among good:
    nothing is written in any group."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(16)) for _ in range(3)]
    opt = fat.AdamW([{"params": a[:2]}, {"params": a[2:]}])
    for _ in range(2):
        for p in a:
            p.grad = torch.randn(16)
        opt.step()
    snap = lambda: [_bits(t) for p in a for t in (p, opt.state[p]["exp_avg"],  # noqa: E731
                                                    opt.state[p]["exp_avg_sq"],
                                                    opt.state[p]["step"])]
    before = snap()
    a[1].grad = a[0].detach()                      # shares memory with an output
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, snap()))
    a[1].grad = torch.randn(16)
    a[1].grad.data = torch.randn(16, dtype=torch.float64)   # bypasses the grad setter
    with pytest.raises(TypeError, match="parameter 1 of param group 0"):
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(before, snap()))


def _one_param(kind, n):
    """(param, optimizer) with a gradient set: dense AdamW, AdamW8bit (8-bit state from
    4096 elements) or SparseAdam (a COO grad)."""
    if kind == "q8":
        p = torch.nn.Parameter(torch.randn(max(n, 4096)))
        p.grad = torch.randn(max(n, 4096))
        return p, fat.AdamW8bit([p])
    if kind == "sparse":
        p = torch.nn.Parameter(torch.randn(n, 4))
        p.grad = torch.sparse_coo_tensor(torch.tensor([[0, n - 1, 0]]), torch.randn(3, 4),
                                         (n, 4), check_invariants=True)
        return p, fat.SparseAdam([p])
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    return p, fat.AdamW([p])


@pytest.mark.parametrize("kind", ["dense", "sparse", "q8"])
def test_threads_sharing_one_optimizer_lose_no_step(kind):
    p, opt = _one_param(kind, 64)
    errors = []

    def work():
        try:
            for _ in range(200):
                opt.step()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert float(opt.state[p]["step"]) == 400.0


@pytest.mark.parametrize("kind", ["dense", "sparse", "q8"])
def test_pickle_and_deepcopy_get_their_own_lock(kind):
    import copy
    import pickle
    p, opt = _one_param(kind, 4)
    opt.step()
    for c in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert c._lock is not opt._lock
        q = c.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        c.step()
        assert float(c.state[q]["step"]) == 2.0


def test_step_hooks_and_global_hooks_run_and_may_change_args():
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = fat.Adam([p])
    seen = []
    h1 = opt.register_step_pre_hook(lambda o, args, kw: seen.append(("pre", args[0] is o)))
    h2 = opt.register_step_post_hook(lambda o, args, kw: seen.append(("post", len(args))))
    h3 = register_optimizer_step_pre_hook(lambda o, args, kw: seen.append(("gpre", kw)))
    h4 = register_optimizer_step_post_hook(lambda o, args, kw: seen.append(("gpost",)))
    try:
        opt.step()
    finally:
        for h in (h1, h2, h3, h4):
            h.remove()
    assert seen == [("gpre", {}), ("pre", True), ("post", 1), ("gpost",)]
    calls = []
    h = opt.register_step_pre_hook(lambda o, args, kw: (args, {"closure": lambda: calls.append(1)
                                                               or 3.0}))
    try:
        assert opt.step() == 3.0 and calls == [1]
    finally:
        h.remove()
    opt.step()
    assert float(opt.state[p]["step"]) == 3.0 and not opt._optimizer_step_pre_hooks


def test_profiler_sees_the_step_range():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = fat.AdamW([p])
    opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events()]
    assert "Optimizer.step#AdamW.step" in names


def test_torch_does_not_wrap_the_step():
    """torch's profile_hook_step wrapper is not put around the drop-ins' step."""
    assert fat.Adam.step is fat.AdamW.step
    assert fat.Adam.step.__qualname__ == "Stepper.step"


def test_grad_scaler_on_the_fast_path_skips_inf_and_unscales():
    a, opt, b, ref = _pair()
    scalers = [torch.amp.GradScaler("cpu", init_scale=4.0) for _ in range(2)]
    for s in range(4):
        g = torch.Generator().manual_seed(s)
        ws = [torch.randn(p.shape, generator=g) for p in a]
        if s == 2:
            ws[0][0] = float("inf")
        for ps, o, sc in ((a, opt, scalers[0]), (b, ref, scalers[1])):
            o.zero_grad()
            sc.scale(sum((p * w).sum() for p, w in zip(ps, ws))).backward()
            sc.step(o)
            sc.update()
        assert _same(a, b), s
    assert float(opt.state[a[0]]["step"]) == float(ref.state[b[0]]["step"]) == 3.0
    assert _fast_used(opt)
