"""fastadam.torch.Adam8bit/AdamW8bit (issue 13): the same bits as the numpy
optimizer with state_dtype='q8', torch's state vocabulary, checkpoints
(torch.save, fastadam.save/load, numpy-layout dicts) resume bit-identically,
GradScaler's grad_scale/found_inf, rejections; bitsandbytes state
converters checked against bitsandbytes' own CPU AdamW8bit."""
import copy

import numpy as np
import pytest
from conftest import assert_bitwise

torch = pytest.importorskip("torch")
import fastadam as fa  # noqa: E402
import fastadam.torch as fat  # noqa: E402
from fastadam import _quant as Q  # noqa: E402

SHAPES = [(80, 64), (300,), (4096,), (33, 257)]


def _init(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _grads(rng):
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _tparams(init):
    return [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]


def _tstep(opt, ps, gs):
    for p, g in zip(ps, gs):
        p.grad = torch.from_numpy(g.copy())
    opt.step()


@pytest.mark.parametrize("cls,ncls,kw", [
    (fat.AdamW8bit, fa.AdamW, {"weight_decay": 0.05}),
    (fat.Adam8bit, fa.Adam, {"weight_decay": 0.01, "maximize": True, "betas": (0.8, 0.99)}),
])
def test_equals_numpy_optimizer_bitwise(cls, ncls, kw):
    init = _init()
    tps = _tparams(init)
    nps = [a.copy() for a in init]
    topt = cls(tps, lr=1e-2, **kw)
    nopt = ncls(nps, lr=1e-2, state_dtype="q8", **kw)
    rng = np.random.default_rng(1)
    for _ in range(3):
        gs = _grads(rng)
        _tstep(topt, tps, gs)
        nopt.step(gs)
    assert_bitwise([p.detach().numpy() for p in tps], nps)
    st = topt.state[tps[0]]
    assert sorted(st) == ["exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax",
                          "step"]
    assert st["step"].dtype == torch.float32 and float(st["step"]) == 3
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == tps[0].shape
    assert topt.state[tps[1]]["exp_avg"].dtype == torch.float32       # under 4096 elements
    assert topt.param_groups[0]["state_dtype"] == "q8"
    nb = sum(t.numel() * t.element_size() for k, t in st.items() if k != "step")
    assert nb / tps[0].numel() <= 2.1


def test_follows_torch_adamw_to_quantisation_error():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    ref = copy.deepcopy(model)
    # one thread: small arrays, and an OpenMP team waiting for time slices on a
    # shared machine would only slow the test
    opt = fat.AdamW8bit(model.parameters(), lr=3e-3, n_threads=1)
    ropt = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    x, y = torch.randn(256, 64), torch.randn(256, 8)
    losses = []
    for m, o in ((model, opt), (ref, ropt)):
        curve = []
        for _ in range(60):
            loss = torch.nn.functional.mse_loss(m(x), y)
            o.zero_grad()
            loss.backward()
            o.step()
            curve.append(loss.item())
        losses.append(curve)
    q8, f32 = np.array(losses[0]), np.array(losses[1])
    assert q8[-1] < 0.7 * q8[0]                                   # it trains
    assert abs(q8[-1] - f32[-1]) < 0.03 * f32[-1], (q8[-1], f32[-1])


def test_checkpoints_resume_bit_identically(tmp_path):
    init = _init(2)
    rng = np.random.default_rng(3)
    ps = _tparams(init)
    opt = fat.AdamW8bit(ps, lr=1e-2)
    for _ in range(2):
        _tstep(opt, ps, _grads(rng))
    torch.save(opt.state_dict(), tmp_path / "t.pt")
    fa.save(opt.state_dict(), tmp_path / "f.npz")
    runs = []
    for load in (lambda: torch.load(tmp_path / "t.pt"), lambda: fa.load(tmp_path / "f.npz")):
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        o = fat.AdamW8bit(qs, lr=1e-2)
        o.load_state_dict(load())
        assert o.state[qs[0]]["exp_avg"].dtype == torch.uint8
        runs.append((qs, o))
    # the numpy optimizer's checkpoint (numpy layout) too
    nps = [p.detach().numpy().copy() for p in ps]
    nopt = fa.AdamW(nps, lr=1e-2, state_dtype="q8")
    nopt.load_state_dict(fa.load(tmp_path / "f.npz"))
    for _ in range(3):
        gs = _grads(rng)
        _tstep(opt, ps, gs)
        for qs, o in runs:
            _tstep(o, qs, gs)
        nopt.step(gs)
    for qs, _ in runs:
        assert_bitwise([q.detach().numpy() for q in qs], [p.detach().numpy() for p in ps])
    assert_bitwise(nps, [p.detach().numpy() for p in ps])


def test_grad_scaler_protocol():
    init = _init(4)
    rng = np.random.default_rng(5)
    gs = _grads(rng)
    a, b = _tparams(init), _tparams(init)
    oa, ob = fat.Adam8bit(a, lr=1e-2), fat.Adam8bit(b, lr=1e-2)
    _tstep(oa, a, gs)
    ob.grad_scale = torch.tensor(8.0)
    _tstep(ob, b, [g * np.float32(8) for g in gs])          # exact: a power of two
    assert_bitwise([p.detach().numpy() for p in a], [p.detach().numpy() for p in b])
    ob.found_inf = torch.tensor(1.0)
    before = [p.detach().clone() for p in b]
    _tstep(ob, b, gs)
    assert all(torch.equal(p, q) for p, q in zip(b, before))
    assert float(ob.state[b[0]]["step"]) == 1


@pytest.mark.parametrize("kw", [{"amsgrad": True}, {"capturable": True},
                                {"differentiable": True}, {"lr": -1.0}])
def test_bad_options(kw):
    with pytest.raises(ValueError):
        fat.AdamW8bit(_tparams(_init()), **kw)


def test_bad_checkpoint_changes_nothing():
    ps = _tparams(_init(6))
    opt = fat.AdamW8bit(ps, lr=1e-2)
    _tstep(opt, ps, _grads(np.random.default_rng(7)))
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg_absmax"] = -bad["state"][0]["exp_avg_absmax"] - 1
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].float()
    with pytest.raises(TypeError, match="exp_avg"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    for i in before["state"]:
        for k, v in before["state"][i].items():
            assert torch.equal(v, after["state"][i][k])


def test_convergence_within_tolerance_of_float32():
    """The convergence harness's char LM, short: 8-bit state trains like float32
    state (final held-out loss within 1 %, every train loss within 0.02 nats)
    and is really 8-bit (the curves are not identical)."""
    from fastadam.bench import convergence as cv
    short = cv.short_shape(steps=30)
    data = cv.Data(short)
    f32, q8 = cv.train("float32", short, data), cv.train("q8", short, data)
    assert q8["final_eval_loss"] < 0.8 * q8["eval_loss"][0]
    assert abs(q8["final_eval_loss"] - f32["final_eval_loss"]) < 0.01 * f32["final_eval_loss"]
    diff = np.abs(np.array(q8["train_loss"]) - np.array(f32["train_loss"]))
    assert diff.max() < 0.02 and diff.max() > 0


# ------------------------------------------------------------- bitsandbytes

bnb = pytest.importorskip("bitsandbytes")


def _bnb_pair(n=5000, seed=8):
    """A bitsandbytes AdamW8bit on CPU and its parameter after two steps."""
    rng = np.random.default_rng(seed)
    p = torch.nn.Parameter(torch.from_numpy(rng.standard_normal(n).astype(np.float32)))
    opt = bnb.optim.AdamW8bit([p], lr=1e-2)
    for _ in range(2):
        p.grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        opt.step()
    return p, opt


def test_bnb_layout_and_dequantised_values_carry_over():
    from bitsandbytes import functional as bf
    p, opt = _bnb_pair()
    bst = opt.state[p]
    ours = fat.from_bitsandbytes_state(bst)
    assert float(ours["step"]) == bst["step"] == 2
    for k, sk, ak, signed in (("exp_avg", "state1", "absmax1", True),
                              ("exp_avg_sq", "state2", "absmax2", False)):
        assert ours[k].dtype == torch.uint8 and torch.equal(ours[k], bst[sk])
        theirs = bf.dequantize_blockwise(bst[sk], absmax=bst[ak],
                                         code=bst["qmap1" if signed else "qmap2"],
                                         blocksize=256).numpy()
        mine = Q.dequantize(ours[k].numpy(), ours[k + "_absmax"].numpy(), signed)
        assert_bitwise([mine], [theirs], k)
    back = fat.to_bitsandbytes_state(ours)
    for k in ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2"):
        assert torch.equal(back[k], bst[k]), k
    assert back["step"] == 2


def test_bnb_state_continues_in_fastadam_and_back():
    """bitsandbytes' state after two of its steps, converted: fastadam's next
    step and bitsandbytes' own next step agree to the arithmetic's rounding
    (bitsandbytes' update is torch mul/add ops, not torch fused's fmas), and
    fastadam's state converted back steps on in bitsandbytes."""
    p, opt = _bnb_pair()
    q = torch.nn.Parameter(p.detach().clone())
    fopt = fat.AdamW8bit([q], lr=1e-2)
    converted = copy.deepcopy(fat.from_bitsandbytes_state(opt.state[p]))   # (shares memory)
    fopt.load_state_dict({"state": {0: converted},
                          "param_groups": [dict(fopt.state_dict()["param_groups"][0])]})
    g = torch.from_numpy(np.random.default_rng(9).standard_normal(p.numel()).astype(np.float32))
    p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    fopt.step()
    step = (p.detach() - q.detach()).abs().max().item()
    assert step < 1e-5, step                       # lr 1e-2: the update itself is ~1e-2
    codes = (opt.state[p]["state1"].int() - fopt.state[q]["exp_avg"].int()).abs()
    assert codes.max() <= 1 and (codes > 0).float().mean() < 0.01
    # and back: fastadam's state into bitsandbytes' optimizer
    r = torch.nn.Parameter(q.detach().clone())
    bopt = bnb.optim.AdamW8bit([r], lr=1e-2)
    r.grad = g.clone()
    bopt.step()                                   # creates its state; replace it
    r.data.copy_(q.detach())
    bopt.state[r].update(copy.deepcopy(fat.to_bitsandbytes_state(fopt.state[q])))
    r.grad, q.grad = g.clone(), g.clone()
    bopt.step()
    fopt.step()
    assert (r.detach() - q.detach()).abs().max().item() < 1e-5


def test_bnb_other_map_rejected():
    p, opt = _bnb_pair()
    st = dict(opt.state[p])
    st["qmap1"] = st["qmap1"].clone()
    st["qmap1"][3] += 1e-3
    with pytest.raises(ValueError, match="qmap1"):
        fat.from_bitsandbytes_state(st)
