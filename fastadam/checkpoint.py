"""Checkpoint files: :func:`save` / :func:`load` an optimizer ``state_dict``.

Design: one file format for every optimizer of the family -- fastadam's
numpy ``Adam``/``AdamW``/``SparseAdam``, the ``fastadam.torch`` drop-ins and
``torch.optim.Adam``/``AdamW``/``SparseAdam`` -- so a checkpoint written from
any of them loads into any other that runs the same algorithm.

* The file is a ``.npz`` (a zip of ``.npy`` members, readable by
  ``np.load``) holding one uint8 member ``__header__`` (UTF-8 JSON: the
  param groups, every state entry's ``step``, and for every array its member
  name, dtype, shape and CRC-32) and one member per state array.
* :func:`save` accepts numpy arrays and (CPU or not) torch tensors; ``step``
  is stored as an integer (a non-integral step is refused), param group
  values as JSON (tuples, numpy scalars and 1-element tensors become plain
  numbers/lists). Everything is validated before anything is written, then
  the file is written next to ``path`` and renamed over it atomically: a
  failed ``save`` never damages the previous checkpoint.
* :func:`load` never unpickles. It returns numpy's layout (ndarrays, ``step``
  an int) or, with ``as_torch=True``, torch's (see
  :func:`fastadam.torch.to_torch_state_dict`). Each array is read once into
  its final buffer (peak memory ~1x the data), checked against the header's
  dtype, shape and CRC-32; anything damaged, truncated or not written by
  :func:`save` raises a ``ValueError`` naming the file.
* Files written by fastadam before this format (header without
  ``"format"``) still load (the zip CRC-32 is checked; they carry no
  per-array checksums).
"""
import json
import math
import numbers
import os
import secrets
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any, Union

import numpy as np
import numpy.typing as npt

__all__ = ["save", "load"]

StateDict = dict[str, Any]
PathLike = Union[str, "os.PathLike[str]"]

FORMAT = "fastadam-checkpoint"
VERSION = 2
_HEADER = "__header__.npy"
_CHUNK = 1 << 20          # bytes per read: the data are read into their final buffer
_MAX_DEPTH = 32           # nesting of param group values


# What a damaged or foreign file can make zipfile, numpy's .npy header parser, the
# JSON decoder or the checks here raise (all reported as one ValueError naming the file).
_DAMAGE = (ValueError, KeyError, TypeError, AttributeError, IndexError, EOFError,
           OverflowError, RecursionError, MemoryError, NotImplementedError, OSError,
           SyntaxError, zipfile.BadZipFile, zlib.error)


class _Bad(ValueError):
    """Damage or a malformed checkpoint (wrapped with the file name by ``load``)."""


# -- save ---------------------------------------------------------------------------------------

def _as_array(value: Any, where: str) -> Any:
    """``value`` as a contiguous numeric ndarray; a bfloat16 array or tensor as
    ``(its uint16 bits, "bfloat16")`` (numpy has no bfloat16 of its own)."""
    if hasattr(value, "detach") and hasattr(value, "numpy"):   # a torch tensor
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if str(t.dtype) == "torch.bfloat16":    # saved as its bits (see _encode)
            import torch
            return np.ascontiguousarray(t.contiguous().view(torch.int16).numpy()
                                        .view(np.uint16)), "bfloat16"
        try:
            arr = t.numpy()
        except TypeError as e:   # a dtype without a numpy counterpart
            raise TypeError(f"{where}: a tensor of dtype {t.dtype} cannot be saved ({e})") from None
    else:
        arr = value
    if arr.dtype.name == "bfloat16" and arr.dtype.kind == "V":     # ml_dtypes.bfloat16
        return np.ascontiguousarray(arr).view(np.uint16), "bfloat16"
    if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
        raise TypeError(f"{where}: arrays of dtype {arr.dtype} cannot be saved (numeric "
                        "arrays only; checkpoints are never pickled)")
    return np.ascontiguousarray(arr), None


def _from_bits(bits: npt.NDArray[Any], fmt: Any, where: str) -> npt.NDArray[Any]:
    """The array of a 16-bit ``format`` saved as its uint16 bits."""
    if fmt != "bfloat16" or bits.dtype != np.uint16:
        raise _Bad(f"{where}: unknown array format {fmt!r} for {bits.dtype}")
    try:
        import ml_dtypes
    except ImportError:
        raise _Bad(f"{where} is bfloat16: loading it needs the ml_dtypes package "
                   "(pip install ml_dtypes)") from None
    return bits.view(ml_dtypes.bfloat16)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "numpy"))


def _number(value: Any, where: str) -> Any:
    """A JSON scalar from a Python/numpy scalar or a 1-element array/tensor."""
    if _is_array(value):
        arr, fmt = _as_array(value, where)
        if fmt is not None:
            arr = _from_bits(arr, fmt, where)
        if arr.size != 1:
            raise TypeError(f"{where}: an array of shape {arr.shape} cannot be a param group "
                            "value (numbers, strings, lists and dicts only)")
        value = arr.reshape(()).item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, complex):
        raise TypeError(f"{where}: complex numbers cannot be saved")
    raise TypeError(f"{where}: {type(value).__name__} is not JSON serializable (numbers, "
                    "strings, None, lists, tuples and dicts with str keys only)")


def _jsonable(value: Any, where: str, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {_MAX_DEPTH} levels (a cycle?)")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str")
            out[k] = _jsonable(v, f"{where}[{k!r}]", depth + 1)
        return out
    return _number(value, where)


def _index(key: Any, where: str) -> int:
    if isinstance(key, (bool, np.bool_)):
        raise TypeError(f"{where}: {key!r} is not a parameter index")
    if isinstance(key, str) and key.isdigit():
        return int(key)
    if isinstance(key, numbers.Integral):
        return int(key)
    raise TypeError(f"{where}: {key!r} is not a parameter index (an int)")


def _step(value: Any, where: str) -> int:
    v = _number(value, where)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{where}: must be a number, got {type(value).__name__}")
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise ValueError(f"{where}: {v!r} is not a whole number of steps")
        v = int(v)
    if v < 0:
        raise ValueError(f"{where}: must be >= 0, got {v}")
    return v


def _encode(state_dict: Any) -> tuple[bytes, list[tuple[str, npt.NDArray[Any]]]]:
    """Validate a state dict; return the JSON header and the (member, array) pairs."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise TypeError("state_dict must be a dict with 'state' and 'param_groups' (an "
                        "optimizer's state_dict())")
    states, groups = state_dict["state"], state_dict["param_groups"]
    if not isinstance(states, Mapping):
        raise TypeError("state_dict['state'] must be a dict")
    if not isinstance(groups, (list, tuple)):
        raise TypeError("state_dict['param_groups'] must be a list")
    arrays: list[tuple[str, npt.NDArray[Any]]] = []
    state_meta = {}
    for key, st in states.items():
        i = _index(key, "state key")
        where = f"state {i}"
        if str(i) in state_meta:
            raise ValueError(f"{where} appears twice")
        if not isinstance(st, Mapping):
            raise TypeError(f"{where} must be a dict, got {type(st).__name__}")
        entries = {}
        for k, v in st.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a str")
            if k == "step":
                entries[k] = {"kind": "step", "value": _step(v, f"{where} 'step'")}
            elif _is_array(v):
                arr, fmt = _as_array(v, f"{where} '{k}'")
                member = f"a{len(arrays)}"
                arrays.append((member, arr))
                entries[k] = {"kind": "array", "member": member, "dtype": arr.dtype.str,
                              "shape": list(arr.shape), "crc32": _crc32(arr)}
                if fmt is not None:        # a 16-bit format held as uint16 bits
                    entries[k]["format"] = fmt
            else:
                entries[k] = {"kind": "value", "value": _jsonable(v, f"{where} '{k}'")}
        state_meta[str(i)] = entries
    gmeta = []
    for gi, g in enumerate(groups):
        if not isinstance(g, Mapping) or "params" not in g:
            raise TypeError(f"param group {gi} must be a dict with 'params'")
        gd = _jsonable(g, f"param group {gi}")
        gd["params"] = [_index(p, f"param group {gi} 'params'") for p in g["params"]]
        gmeta.append(gd)
    header = {"format": FORMAT, "version": VERSION, "state": state_meta, "param_groups": gmeta}
    return json.dumps(header).encode("utf-8"), arrays


def _crc32(arr: npt.NDArray[Any]) -> int:
    flat = arr.reshape(-1)
    return zlib.crc32(flat.view(np.uint8).data) if flat.size else 0


def save(state_dict: StateDict, path: PathLike) -> None:
    """Write an optimizer ``state_dict`` to ``path`` (a ``.npz`` file, no pickle).

    Parameters
    ----------
    state_dict : dict
        ``state_dict()`` of fastadam's ``Adam``/``AdamW``/``SparseAdam``, of
        a ``fastadam.torch`` drop-in or of ``torch.optim.Adam``/``AdamW``/
        ``SparseAdam``. State arrays may be ndarrays or tensors (copied to
        the CPU); ``step`` must be a whole number >= 0; param group values
        must be numbers, strings, None, lists/tuples or dicts of them (numpy
        scalars and 1-element tensors are saved as numbers).
    path : str or os.PathLike
        The file, written exactly there (no suffix is added).

    Raises
    ------
    TypeError, ValueError
        For anything that cannot be saved; nothing is written then.

    Notes
    -----
    Everything is validated first; the file is then written to a temporary
    name in the same directory and renamed over ``path`` (atomic on POSIX and
    Windows), so an existing checkpoint is either replaced whole or left as it
    was. The header records every array's dtype, shape and CRC-32, which
    :func:`load` verifies.

    Examples
    --------
    >>> import numpy as np, fastadam as fa, tempfile, os
    >>> w = np.zeros(2); opt = fa.Adam([w]); opt.step([np.ones(2)])
    >>> f = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
    >>> fa.save(opt.state_dict(), f)
    >>> fa.load(f)["state"][0]["step"]
    1
    """
    header, arrays = _encode(state_dict)
    path = os.fspath(path)
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                _write(zf, _HEADER, np.frombuffer(header, np.uint8))
                for member, arr in arrays:
                    _write(zf, member + ".npy", arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write(zf: zipfile.ZipFile, name: str, arr: npt.NDArray[Any]) -> None:
    with zf.open(name, "w", force_zip64=True) as fp:
        np.lib.format.write_array(fp, arr, allow_pickle=False)


# -- load ---------------------------------------------------------------------------------------

def _read(zf: zipfile.ZipFile, name: str, spec: Any = None) -> npt.NDArray[Any]:
    """Read one ``.npy`` member into a fresh array, checked against ``spec``
    (dtype, shape, crc32) if given; the zip's own CRC-32 is checked at its end."""
    try:
        fp = zf.open(name)
    except KeyError:
        raise _Bad(f"member {name!r} is missing") from None
    with fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise _Bad(f"member {name!r}: unsupported .npy version {version}")
        if dtype.hasobject or dtype.kind not in "biufc":
            raise _Bad(f"member {name!r} holds dtype {dtype} (fastadam writes numeric arrays "
                       "only and never unpickles)")
        if spec is not None:
            if not isinstance(spec, Mapping):
                raise _Bad(f"the header's entry for {name!r} is malformed")
            if dtype.str != spec.get("dtype") or list(shape) != spec.get("shape") or \
                    (fortran and len(shape) > 1):
                raise _Bad(f"member {name!r} is {dtype.str} {shape}, the header says "
                           f"{spec.get('dtype')} {spec.get('shape')}")
        arr = np.empty(shape, dtype, order="F" if fortran else "C")
        buf = arr.reshape(-1, order="A").view(np.uint8) if arr.size else np.empty(0, np.uint8)
        n, off, crc = buf.size, 0, 0
        while off < n:
            chunk = fp.read(min(_CHUNK, n - off))
            if not chunk:
                raise _Bad(f"member {name!r} is truncated ({off} of {n} bytes)")
            buf[off:off + len(chunk)] = np.frombuffer(chunk, np.uint8)
            crc = zlib.crc32(chunk, crc)
            off += len(chunk)
        if fp.read(1):   # reaching the end also makes zipfile check the member's CRC-32
            raise _Bad(f"member {name!r} is longer than its array")
    if spec is not None and crc != spec.get("crc32"):
        raise _Bad(f"member {name!r}: checksum mismatch (the data are damaged)")
    return arr


def _load_step(v: Any, where: str) -> int:
    if type(v) is not int or v < 0:
        raise _Bad(f"{where}: step {v!r} is not an int >= 0")
    return v


def _groups(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise _Bad("'param_groups' is not a list")
    groups = []
    for gi, g in enumerate(raw):
        if not isinstance(g, dict) or not isinstance(g.get("params"), list) or \
                not all(type(i) is int for i in g["params"]):
            raise _Bad(f"param group {gi} is malformed")
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return groups


def _decode(zf: zipfile.ZipFile) -> StateDict:
    raw = _read(zf, _HEADER)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise _Bad("the header is not a uint8 vector")
    header = json.loads(raw.tobytes().decode("utf-8"))
    if not isinstance(header, dict) or not isinstance(header.get("state"), dict):
        raise _Bad("the header is not a fastadam checkpoint header")
    state: dict[int, dict[str, Any]] = {}
    if "format" not in header:        # written before the format had a version
        for key, meta in header["state"].items():
            st: dict[str, Any] = {"step": _load_step(meta["step"], f"state {key}")}
            for k in meta.get("arrays", []):
                st[k] = _read(zf, f"state/{key}/{k}.npy")
            state[int(key)] = st
        return {"state": state, "param_groups": _groups(header.get("param_groups"))}
    if header["format"] != FORMAT:
        raise _Bad(f"the header's format is {header['format']!r}, not {FORMAT!r}")
    if header.get("version") != VERSION:
        raise _Bad(f"format version {header.get('version')!r} is not {VERSION} (written by "
                   "another fastadam version?)")
    for key, entries in header["state"].items():
        if not key.isdigit() or not isinstance(entries, dict):
            raise _Bad(f"state {key!r} is malformed")
        st = {}
        for k, e in entries.items():
            kind = e.get("kind") if isinstance(e, dict) else None
            if kind == "step":
                st[k] = _load_step(e.get("value"), f"state {key}")
            elif kind == "array":
                st[k] = _read(zf, f"{e.get('member')}.npy", e)
                if "format" in e:
                    st[k] = _from_bits(st[k], e["format"], f"state {key} '{k}'")
            elif kind == "value":
                st[k] = e.get("value")
            else:
                raise _Bad(f"state {key} '{k}' is malformed")
        state[int(key)] = st
    return {"state": state, "param_groups": _groups(header.get("param_groups"))}


def load(path: PathLike, *, as_torch: bool = False) -> StateDict:
    """Read a state dict written by :func:`save`.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.
    as_torch : bool
        False (default): numpy's layout -- ndarrays and ``step`` an int, as
        fastadam's numpy optimizers' ``state_dict()``; this also loads into
        the ``fastadam.torch`` drop-ins, which convert it. True: torch's
        layout for ``torch.optim`` optimizers' ``load_state_dict`` (tensors;
        ``step`` a float32 scalar tensor for Adam/AdamW, an int for
        SparseAdam), see :func:`fastadam.torch.to_torch_state_dict`.

    Returns
    -------
    dict
        ``{"state": {index: {...}}, "param_groups": [...]}``; ``betas`` are
        tuples; the arrays are fresh (not shared with anything).

    Raises
    ------
    ValueError
        If the file is damaged, truncated or not a fastadam checkpoint; the
        message names the file. (A missing file raises ``FileNotFoundError``.)
    """
    name = os.fspath(path)
    with open(name, "rb") as f:    # a missing or unreadable file: the OSError as it is
        try:
            zf = zipfile.ZipFile(f)
        except _DAMAGE as e:
            raise ValueError(f"fastadam.load: {name!r} is not a fastadam checkpoint (not a "
                             f"valid .npz file: {type(e).__name__}: {e})") from e
        with zf:
            try:
                sd = _decode(zf)
            except _DAMAGE as e:
                what = str(e) if isinstance(e, _Bad) else f"{type(e).__name__}: {e}"
                raise ValueError(f"fastadam.load: {name!r} is damaged or not a fastadam "
                                 f"checkpoint ({what})") from e
    if as_torch:
        from .torch import to_torch_state_dict
        sd = to_torch_state_dict(sd)
    return sd
