"""Checkpoints: fastadam.save/load, and state dicts crossing between fastadam's numpy
optimizers, the fastadam.torch drop-ins and torch.optim (every direction)."""
import copy
import json
import os
import random
import tracemalloc
import zipfile

import numpy as np
import pytest

import fastadam as fa

torch = pytest.importorskip("torch")
import fastadam.torch as fat  # noqa: E402

SHAPES = [(32,), (4, 16)]          # multiples of 16: no tail gaps vs torch fused
DENSE = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.02, amsgrad=True)
SPARSE = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8)


# -- runners: one interface over the nine optimizers --

class _Run:
    """One optimizer of kind 'lib.Name' (lib: np, fat, torch) over float32 params."""

    def __init__(self, kind, init, lr=None):
        self.kind = kind
        self.lib, self.name = kind.split(".")
        self.sparse = self.name == "SparseAdam"
        if self.lib == "np":
            self.ps = [a.copy() for a in init]
        else:
            self.ps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
        if self.sparse:
            kw = dict(SPARSE, lr=lr or SPARSE["lr"])
            if self.lib == "np":
                self.opt = fa.SparseAdam(self.ps[0], **kw)
            else:
                self.opt = (fat if self.lib == "fat" else torch.optim).SparseAdam(self.ps, **kw)
        else:
            kw = dict(DENSE, lr=lr or DENSE["lr"])
            groups = [{"params": self.ps[:1]}, {"params": self.ps[1:], "lr": (lr or 3e-3)}]
            mod = {"np": fa, "fat": fat, "torch": torch.optim}[self.lib]
            self.opt = getattr(mod, self.name)(groups, **kw)

    def step(self, seed):
        rng = np.random.default_rng(seed)
        if self.sparse:
            n = self.params()[0].shape[0]
            ids = np.sort(rng.choice(n, 3, replace=False))
            rows = rng.standard_normal((3, self.params()[0].shape[1])).astype(np.float32)
            if self.lib == "np":
                self.opt.step(ids, rows)
            else:
                p = self.ps[0]
                p.grad = torch.sparse_coo_tensor(torch.from_numpy(ids)[None],
                                                 torch.from_numpy(rows), p.shape,
                                                 check_invariants=True)
                self.opt.step()
            return
        gs = [rng.standard_normal(a.shape).astype(np.float32) for a in self.params()]
        if self.lib == "np":
            self.opt.step(gs)
        else:
            for p, g in zip(self.ps, gs):
                p.grad = torch.from_numpy(g)
            self.opt.step()

    def params(self):
        return [p if self.lib == "np" else p.detach().numpy() for p in self.ps]

    def state(self):
        out = {}
        for i, st in self.opt.state_dict()["state"].items():
            out[i] = {k: (int(float(v)) if k == "step" else
                          v.detach().numpy().copy() if isinstance(v, torch.Tensor) else v.copy())
                      for k, v in st.items()}
        return out

    def groups(self):
        keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")
        return [{k: (tuple(float(b) for b in g[k]) if k == "betas" else g[k])
                 for k in keys if k in g} for g in self.opt.state_dict()["param_groups"]]

    def load(self, path):
        self.opt.load_state_dict(fa.load(path, as_torch=self.lib == "torch"))


def _init(sparse):
    rng = np.random.default_rng(0)
    shapes = [(8, 16)] if sparse else SHAPES
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _same_state(a, b):
    assert a.keys() == b.keys()
    for i in a:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            if k == "step":
                assert a[i][k] == b[i][k], (i, k)
            else:
                assert a[i][k].dtype == b[i][k].dtype and np.array_equal(a[i][k], b[i][k]), (i, k)


_DENSE_KINDS = [f"{lib}.{n}" for lib in ("np", "fat", "torch") for n in ("Adam", "AdamW")]
_SPARSE_KINDS = ["np.SparseAdam", "fat.SparseAdam", "torch.SparseAdam"]
_PAIRS = ([(a, b) for a in _DENSE_KINDS for b in _DENSE_KINDS if a.split(".")[1] == b.split(".")[1]]
          + [(a, b) for a in _SPARSE_KINDS for b in _SPARSE_KINDS])


@pytest.mark.parametrize("src,dst", _PAIRS, ids=[f"{a}->{b}" for a, b in _PAIRS])
def test_checkpoint_file_crosses_between_all_optimizers(tmp_path, src, dst):
    """save() from any optimizer of the family, load() into any with the same algorithm:
    state bit-identical, hyperparameters kept, training continues alike."""
    sparse = "Sparse" in src
    a = _Run(src, _init(sparse))
    for s in range(3):
        a.step(s)
    path = tmp_path / "ckpt.npz"
    fa.save(a.opt.state_dict(), path)
    b = _Run(dst, a.params(), lr=0.5)       # other hyperparameters: the file's must win
    b.load(path)
    _same_state(b.state(), a.state())
    assert b.groups() == a.groups()
    for s in range(3, 6):
        a.step(s)
        b.step(s)
    for x, y in zip(b.params(), a.params()):
        np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)
    assert {i: st["step"] for i, st in b.state().items()} == \
        {i: st["step"] for i, st in a.state().items()}


@pytest.mark.parametrize("src,dst", _PAIRS, ids=[f"{a}->{b}" for a, b in _PAIRS])
def test_state_dict_crosses_in_memory(src, dst):
    """The same without a file: torch's optimizers take to_torch_state_dict(sd), the
    fastadam.torch drop-ins and the numpy optimizers take any state dict as it is."""
    a = _Run(src, _init("Sparse" in src))
    for s in range(2):
        a.step(s)
    sd = copy.deepcopy(a.opt.state_dict())
    b = _Run(dst, a.params(), lr=0.5)
    b.opt.load_state_dict(fat.to_torch_state_dict(sd) if b.lib == "torch" else sd)
    _same_state(b.state(), a.state())
    b.step(2)                               # and it steps (torch: tensors, step types right)
    if b.lib != "np" and not b.sparse:
        assert all(isinstance(st["step"], torch.Tensor) for st in b.opt.state.values())


# -- fused is recorded, so torch stays on its fused kernel --

@pytest.mark.parametrize("src", ["fat", "np"])
@pytest.mark.parametrize("via", ["memory", "file"])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_fastadam_checkpoint_resumes_torch_fused_bitwise(tmp_path, src, via, name):
    """A fastadam checkpoint loaded into torch.optim.X(fused=True) keeps fused on (torch takes
    the group's flag from the file): the resumed run equals an uninterrupted fused run. (With
    fused=None recorded, torch continued on its for-loop path, off by ulps on these sizes.)"""
    rng = np.random.default_rng(4)
    init = [rng.standard_normal(s).astype(np.float32) for s in [(4096,), (64, 64)]]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.02)
    ref = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
    ref_opt = getattr(torch.optim, name)(ref, fused=True, **kw)
    rng = np.random.default_rng(5)
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in init] for _ in range(8)]

    def torch_step(ps, opt, gs):
        for p, g in zip(ps, gs):
            p.grad = torch.from_numpy(g.copy())
        opt.step()

    for gs in grads:
        torch_step(ref, ref_opt, gs)
    if src == "np":
        ps = [a.copy() for a in init]
        opt = getattr(fa, name)(ps, **kw)
        for gs in grads[:4]:
            opt.step(gs)
        cur = [torch.from_numpy(p.copy()) for p in ps]
    else:
        tps = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in init]
        opt = getattr(fat, name)(tps, **kw)
        for gs in grads[:4]:
            torch_step(tps, opt, gs)
        cur = [p.detach().clone() for p in tps]
    if via == "file":
        fa.save(opt.state_dict(), tmp_path / "c.npz")
        sd = fa.load(tmp_path / "c.npz", as_torch=True)
    elif src == "np":
        sd = fat.to_torch_state_dict(copy.deepcopy(opt.state_dict()))
    else:
        sd = copy.deepcopy(opt.state_dict())       # already torch's layout
    res = [torch.nn.Parameter(c) for c in cur]
    res_opt = getattr(torch.optim, name)(res, fused=True, **kw)
    res_opt.load_state_dict(sd)
    for gs in grads[4:]:
        torch_step(res, res_opt, gs)
    for x, y in zip(res, ref):
        assert torch.equal(x, y), (x - y).abs().max()
    assert all(g["fused"] is True for g in opt.state_dict()["param_groups"])
    assert res_opt.param_groups[0]["fused"] is True


@pytest.mark.parametrize("kw,fused", [(dict(), True), (dict(foreach=False), True),
                                      (dict(fused=False), False), (dict(fused=True), True),
                                      (dict(foreach=True), None)])
def test_fused_flag_recorded_unless_asked_otherwise(kw, fused):
    p = torch.nn.Parameter(torch.zeros(4))
    for cls in (fat.Adam, fat.AdamW):
        opt = cls([p], **kw)
        assert opt.param_groups[0]["fused"] is fused
        t = getattr(torch.optim, cls.__name__)([torch.nn.Parameter(torch.zeros(4))])
        t.load_state_dict(opt.state_dict())      # torch accepts the combination
        assert t.param_groups[0]["fused"] is fused
    z = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
    assert fat.Adam([z]).param_groups[0]["fused"] is None   # torch fused rejects complex
    assert fa.AdamW([np.zeros(4)]).param_groups[0]["fused"] is True


def test_torch_checkpoint_with_fused_none_loads_as_fused():
    p = torch.nn.Parameter(torch.zeros(4))
    t = torch.optim.AdamW([p])
    opt = fat.AdamW([torch.nn.Parameter(torch.zeros(4))])
    opt.load_state_dict(t.state_dict())
    assert opt.param_groups[0]["fused"] is True
    npopt = fa.AdamW([np.zeros(4, np.float32)])
    npopt.load_state_dict(t.state_dict())
    assert npopt.param_groups[0]["fused"] is True


# -- save: validation, JSON-safe values, atomic writes --

def test_save_group_values_json_safe(tmp_path):
    w = np.zeros(16, np.float32)
    opt = fa.AdamW([w], lr=np.float32(1e-3), betas=(np.float64(0.9), 0.999),
                   eps=np.float32(1e-8), weight_decay=np.float64(0.01))
    opt.step([np.ones(16, np.float32)])
    fa.save(opt.state_dict(), tmp_path / "c.npz")
    g = fa.load(tmp_path / "c.npz")["param_groups"][0]
    assert g["lr"] == float(np.float32(1e-3)) and type(g["lr"]) is float
    assert g["betas"] == (0.9, 0.999)
    p = torch.nn.Parameter(torch.zeros(16))
    t = fat.AdamW([p], lr=torch.tensor(1e-3))       # a tensor lr is saved as a number
    p.grad = torch.ones(16)
    t.step()
    fa.save(t.state_dict(), tmp_path / "t.npz")
    assert fa.load(tmp_path / "t.npz")["param_groups"][0]["lr"] == pytest.approx(1e-3)


def _numpy_ckpt(tmp_path, n=64):
    w = np.zeros(n, np.float32)
    opt = fa.Adam([w])
    opt.step([np.ones(n, np.float32)])
    path = tmp_path / "ckpt.npz"
    fa.save(opt.state_dict(), path)
    return opt, path


@pytest.mark.parametrize("bad,exc,match", [
    (lambda sd: sd["state"][0].__setitem__("exp_avg", np.array([object()] * 64)), TypeError,
     "state 0 'exp_avg'.*object"),
    (lambda sd: sd["state"][0].__setitem__("step", 2.7), ValueError, "not a whole number"),
    (lambda sd: sd["state"][0].__setitem__("step", -1), ValueError, ">= 0"),
    (lambda sd: sd["state"][0].__setitem__("step", True), TypeError, "number"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", object()), TypeError,
     "param group 0.*lr.*JSON"),
    (lambda sd: sd["state"].__setitem__("x", {}), TypeError, "parameter index"),
])
def test_save_validates_before_writing(tmp_path, bad, exc, match):
    opt, path = _numpy_ckpt(tmp_path)
    before = path.read_bytes()
    sd = opt.state_dict()
    sd = {"state": {i: dict(st) for i, st in sd["state"].items()},
          "param_groups": [dict(g) for g in sd["param_groups"]]}
    bad(sd)
    with pytest.raises(exc, match=match):
        fa.save(sd, path)
    assert path.read_bytes() == before                  # the old checkpoint is intact
    assert os.listdir(tmp_path) == ["ckpt.npz"]         # no temporary file left
    fa.load(path)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    opt, path = _numpy_ckpt(tmp_path)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(np.lib.format, "write_array", boom)
    with pytest.raises(OSError, match="disk full"):
        fa.save(opt.state_dict(), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_save_accepts_torch_state_and_writes_exact_path(tmp_path):
    p = torch.nn.Parameter(torch.zeros(16))
    t = torch.optim.Adam([p])
    p.grad = torch.ones(16)
    t.step()
    fa.save(t.state_dict(), tmp_path / "ckpt")           # no ".npz" appended
    sd = fa.load(tmp_path / "ckpt")
    assert sd["state"][0]["step"] == 1 and type(sd["state"][0]["step"]) is int
    assert isinstance(sd["state"][0]["exp_avg"], np.ndarray)
    with np.load(tmp_path / "ckpt") as z:                 # a plain .npz
        assert z["a0"].shape == (16,)
    ts = fa.load(tmp_path / "ckpt", as_torch=True)["state"][0]
    assert ts["step"].dtype == torch.float32 and ts["step"].dim() == 0
    assert isinstance(ts["exp_avg"], torch.Tensor)


def test_step_types_after_load_as_torch(tmp_path):
    e = torch.nn.Parameter(torch.zeros(8, 16))
    o = torch.optim.SparseAdam([e])
    e.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 16), (8, 16), check_invariants=True)
    o.step()
    fa.save(o.state_dict(), tmp_path / "s.npz")
    st = fa.load(tmp_path / "s.npz", as_torch=True)["state"][0]
    assert type(st["step"]) is int and st["step"] == 1


# -- load: clear errors, no pickle, no silent damage, no extra copy --

def _write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b"hello"), "not a valid .npz"),
    (lambda p: _write_npz(p, x=np.zeros(3)), "__header__.*missing"),
    (lambda p: _write_npz(p, __header__=np.frombuffer(b"\xff\xfe", np.uint8)), "Unicode"),
    (lambda p: _write_npz(p, __header__=np.frombuffer(b"[" * 100000, np.uint8)),
     "Recursion|JSON|Expecting"),
    (lambda p: _write_npz(p, __header__=np.frombuffer(b'{"x": 1}', np.uint8)), "header"),
    (lambda p: _write_npz(p, __header__=np.frombuffer(json.dumps(
        {"state": {"0": {"step": 1, "arrays": ["exp_avg"]}}, "param_groups": []}).encode(),
        np.uint8), **{"state/0/exp_avg": np.array([object()])}), "object|never unpickles"),
])
def test_load_errors_name_the_file(tmp_path, make, match):
    path = tmp_path / "bad.npz"
    make(path)
    with pytest.raises(ValueError, match=match) as ei:
        fa.load(path)
    assert "bad.npz" in str(ei.value)


def test_load_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        fa.load(tmp_path / "nope.npz")


def test_legacy_checkpoint_still_loads(tmp_path):
    header = {"state": {"0": {"step": 3, "arrays": ["exp_avg", "exp_avg_sq"]}},
              "param_groups": [{"lr": 0.1, "betas": [0.9, 0.99], "params": [0]}]}
    path = tmp_path / "old.npz"
    _write_npz(path, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8),
               **{"state/0/exp_avg": np.ones(4), "state/0/exp_avg_sq": np.full(4, 2.0)})
    sd = fa.load(path)
    assert sd["state"][0]["step"] == 3 and sd["param_groups"][0]["betas"] == (0.9, 0.99)
    assert np.array_equal(sd["state"][0]["exp_avg_sq"], np.full(4, 2.0))


def test_corrupted_files_raise_or_load_identical_data(tmp_path):
    """Truncate or flip bytes of a checkpoint in 60 random ways: each either raises a
    ValueError naming the file, or (damage in bytes nothing reads) loads the same data."""
    rng = np.random.default_rng(0)
    ps = [rng.standard_normal(s).astype(np.float32) for s in [(64,), (8, 16)]]
    opt = fa.AdamW(ps, amsgrad=True)
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps])
    good = tmp_path / "good.npz"
    fa.save(opt.state_dict(), good)
    ref = fa.load(good)
    data = good.read_bytes()
    r = random.Random(1)
    raised = 0
    for k in range(60):
        b = bytearray(data)
        if k % 4 == 0:
            b = b[:r.randrange(len(b))]
        else:
            for _ in range(1 + k % 3):
                b[r.randrange(len(b))] ^= 1 << r.randrange(8)
        bad = tmp_path / f"bad{k}.npz"
        bad.write_bytes(bytes(b))
        try:
            sd = fa.load(bad)
        except ValueError as e:
            assert f"bad{k}.npz" in str(e)
            raised += 1
            continue
        assert sd["param_groups"] == ref["param_groups"], k
        _same_state(sd["state"], ref["state"])
    assert raised > 30


def test_load_reads_each_array_once(tmp_path):
    """Peak memory of load() ~1x the data (no second copy of every array)."""
    n = 1 << 21                                   # 8 MiB per float32 array
    w = np.zeros(n, np.float32)
    opt = fa.Adam([w])
    opt.step([np.ones(n, np.float32)])
    fa.save(opt.state_dict(), tmp_path / "big.npz")
    tracemalloc.start()
    try:
        sd = fa.load(tmp_path / "big.npz")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    data = sum(v.nbytes for v in sd["state"][0].values() if isinstance(v, np.ndarray))
    assert data == 2 * 4 * n
    assert peak < 1.25 * data, (peak, data)


def test_save_load_zip_member_names_plain(tmp_path):
    _, path = _numpy_ckpt(tmp_path)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["__header__.npy", "a0.npy", "a1.npy"]
