"""Storage faults: read-only memory maps as sparse tables or state (refused with a
ValueError before anything is written) and a full disk while saving a checkpoint
(the error propagates, the previous checkpoint survives byte for byte, no
temporary file is left)."""
import errno
import os

import numpy as np
import pytest

import fastadam as fa
from fastadam import checkpoint

# -- read-only memory maps --------------------------------------------------------------------


def _memmap(tmp_path, name, shape, how):
    """A float32 .npy of ``shape`` opened as a read-only memmap: ``mode="r"`` on a
    writable file, or the only way a read-only file (chmod 0444, as on a read-only
    file system) can be mapped."""
    path = tmp_path / f"{name}.npy"
    a = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    a[:] = np.arange(a.size, dtype=np.float32).reshape(shape) / 7
    a.flush()
    del a
    if how == "readonly_file":
        os.chmod(path, 0o444)   # opened O_RDONLY: only a read-only map is possible
    return np.load(path, mmap_mode="r")


HOWS = ["mode_r", "readonly_file"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("which", ["table", "exp_avg", "exp_avg_sq"])
def test_sparse_adam_step_refuses_read_only_memmap_before_writing(tmp_path, how, which):
    shape = (12, 8)
    bufs = {k: np.zeros(shape, np.float32) + i for i, k in
            enumerate(["table", "exp_avg", "exp_avg_sq"])}
    bufs[which] = _memmap(tmp_path, which, shape, how)
    before = {k: np.array(v) for k, v in bufs.items()}
    with pytest.raises(ValueError, match=f"{which} is read-only"):
        fa.sparse_adam_step(bufs["table"], np.array([1, 5, 1]), np.ones((3, 8), np.float32),
                            bufs["exp_avg"], bufs["exp_avg_sq"], step=1)
    for k, v in bufs.items():
        assert np.array_equal(v, before[k]), f"{k} was written"


@pytest.mark.parametrize("how", HOWS)
def test_numpy_sparse_adam_refuses_read_only_memmap_table(tmp_path, how):
    t = _memmap(tmp_path, "table", (12, 8), how)
    before = np.array(t)
    with pytest.raises(ValueError, match="table is read-only"):
        opt = fa.SparseAdam(t)
        opt.step(np.array([1, 2]), np.ones((2, 8), np.float32))
    assert np.array_equal(t, before)


@pytest.mark.parametrize("how", HOWS)
def test_numpy_sparse_adam_read_only_memmap_state_refused_step_unchanged(tmp_path, how):
    """State loaded as read-only maps is copied into fresh buffers by load_state_dict
    (the maps are never written); stepping then works and leaves the files alone."""
    t = np.zeros((12, 8), np.float32)
    opt = fa.SparseAdam(t)
    opt.step(np.array([1, 2]), np.ones((2, 8), np.float32))
    sd = opt.state_dict()
    m = _memmap(tmp_path, "m", (12, 8), how)
    v = _memmap(tmp_path, "v", (12, 8), how)
    mb, vb = np.array(m), np.array(v)
    sd["state"][0]["exp_avg"], sd["state"][0]["exp_avg_sq"] = m, v
    opt.load_state_dict(sd)
    opt.step(np.array([3]), np.ones((1, 8), np.float32))
    assert opt.state["step"] == 2
    assert np.array_equal(m, mb) and np.array_equal(v, vb)


# -- a full disk while saving -----------------------------------------------------------------

def _state_dict(seed):
    opt = fa.AdamW([np.zeros(1000, np.float32)])
    rng = np.random.default_rng(seed)
    for _ in range(2):
        opt.step([rng.standard_normal(1000).astype(np.float32)])
    return opt.state_dict()


class _TinyDisk:
    """A file object whose writes fail with ENOSPC once ``room`` bytes are used."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, b):
        n = len(memoryview(b).cast("B"))
        if n > self._room:
            self._f.write(bytes(memoryview(b).cast("B")[:self._room]))
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(b)

    def __getattr__(self, k):
        return getattr(self._f, k)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self._f.close()
        return False


@pytest.mark.parametrize("where", ["header", "arrays", "fsync", "replace"])
def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    path = tmp_path / "ckpt.npz"
    fa.save(_state_dict(0), path)
    old_bytes = path.read_bytes()
    real_fdopen = os.fdopen
    if where in ("header", "arrays"):
        room = 100 if where == "header" else 5000
        monkeypatch.setattr(checkpoint.os, "fdopen",
                            lambda fd, *a, **k: _TinyDisk(real_fdopen(fd, *a, **k), room))
    elif where == "fsync":
        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    else:
        def replace(a, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError) as ei:
        fa.save(_state_dict(1), path)
    assert ei.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"], "a temporary file was left behind"
    sd = fa.load(path)
    ref = _state_dict(0)
    assert np.array_equal(sd["state"][0]["exp_avg"], ref["state"][0]["exp_avg"])
