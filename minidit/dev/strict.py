"""A CPU backend that behaves like a device, for tests: ``get_backend("strict")``.

CuPy keeps its arrays on the GPU and refuses to mix them with host (NumPy) arrays, so code that passes every test
on NumPy can still fail on the first CUDA run: an ``np.`` call on device data, a host array mixed into device math,
a ``float(loss)`` in the training loop (a device sync every step). This module makes those mistakes fail on a
CPU-only machine, using NumPy underneath:

  * ``StrictArray`` wraps a numpy array (composition, not a subclass: ``np.asarray`` of an ndarray subclass would
    silently succeed). Implicit conversion to NumPy raises TypeError, with CuPy's message: ``np.asarray(a)``,
    ``np.array([a])``, ``np.sum(a)``, ``np.exp(a)``, ``np.add(a, host)``, ``np.testing.*(a, ...)``.
    Explicit transfers are fine: ``a.get()``, ``minidit.xp.to_numpy(a)``, ``strict.asnumpy(a)``.
  * Mixing with a host array (an ``np.ndarray``, 0-d included) raises TypeError: in arithmetic, in ``xp.*``
    functions, as an index, as an assigned value, as ``out=``. Python and NumPy scalars (``np.float32(2)``) are fine.
  * Reading data on the host is allowed, as CuPy allows it, but each read is a device sync and is counted:
    ``float(a)``, ``int(a)``, ``bool(a)``, ``a.item()``, ``a.tolist()``, ``a.get()``, ``f"{a:.3f}"``, ``str(a)``,
    boolean-mask indexing and ``xp.nonzero``/``unique``/... (their result size is read on the host).
    ``sync_count()`` is the running total; ``with track() as t:`` lists each sync with its code location
    (``t.syncs``); ``with no_syncs():`` raises HostSyncError at the first one.
  * Host -> device copies (``xp.asarray``/``xp.array`` of host data, ``a.set(host)``) are allowed, copy the data
    (as a real transfer does), and are counted the same way (``upload_count()``, ``t.uploads``): on CuPy a copy
    from pageable host memory also makes the host wait for the device.
  * This module is itself the array module ("xp") of its arrays (``get_xp(a) is minidit.dev.strict``): every numpy
    function, ufunc, dtype and constant is reachable as ``strict.<name>``; functions unwrap StrictArray arguments,
    refuse host arrays and wrap their results (full reductions give 0-d arrays, as CuPy's do); ``out=`` writes into
    the StrictArray's buffer. ``asarray``/``array`` accept host data (the explicit host -> device transfer, as
    ``cupy.asarray``). ``random.default_rng(seed)`` gives a Generator whose draws are StrictArrays.
    ``ndarray`` is StrictArray. Anything not emulated raises a clear AttributeError instead of falling back to numpy.

Deliberately stricter than CuPy in one respect: CuPy dispatches many numpy calls on its arrays (``np.exp(a)``,
``np.sum(a)``) to itself through ``__array_ufunc__``/``__array_function__``; minidit's rule is that device code
calls ``xp.*``, so strict refuses every numpy function or ufunc called on its arrays. The one exception is a NumPy
scalar on the left of an operator (``np.float32(2) * a``), which NumPy itself turns into a ufunc call.
Deliberately the same as NumPy: the numbers (same random streams for the same seed, same rounding), so a run can be
compared with the numpy backend bit for bit; out-of-bounds indices raise as in NumPy (CuPy wraps them around).
``repr(a)`` is for debugging and is not counted as a sync.
"""
from __future__ import annotations

import contextlib as _contextlib
import numbers as _numbers
import os as _os
import sys as _sys
import types as _types

import numpy as _np

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed (a minidit.dev.strict array stands for a device "
             "array, as CuPy's does). Please use `.get()` or `minidit.xp.to_numpy(a)` to construct a NumPy array "
             "explicitly.")


def _mixing(x, where):
    return TypeError(
        f"Unsupported type {type(x)}: mixing host and device arrays ({where}). Move the host array to the device "
        f"explicitly with minidit.xp.to_device(x, xp) (xp.asarray), or the device array to the host with "
        f"minidit.xp.to_numpy(a)")


def _numpy_call(name):
    return TypeError(
        f"numpy.{name} was called on a minidit.dev.strict (device) array: device code calls the array module of its "
        f"inputs (xp = minidit.xp.get_xp(a); xp.{name}(...)), host code takes its data explicitly with "
        f"minidit.xp.to_numpy(a)")


# ----------------------------------------------------------------------------------------------------------------
# host <-> device traffic: counted, listed, optionally refused
# ----------------------------------------------------------------------------------------------------------------
class HostSyncError(RuntimeError):
    """A device -> host read inside a ``no_syncs()`` block."""


class Traffic:
    """What crossed between host and device inside a ``track()`` block, one description (with its code location)
    per event: ``syncs`` (device -> host reads) and ``uploads`` (host -> device copies)."""

    def __init__(self):
        self.syncs: list[str] = []
        self.uploads: list[str] = []

    def __repr__(self):
        return f"Traffic(syncs={self.syncs!r}, uploads={self.uploads!r})"


_totals = {"syncs": 0, "uploads": 0}
_trackers: list[Traffic] = []
_forbidding = [0]  # depth of nested no_syncs() blocks


def sync_count() -> int:
    """Device -> host syncs made on strict arrays since import (float(a), a.item(), a.get(), ...)."""
    return _totals["syncs"]


def upload_count() -> int:
    """Host -> device copies made into strict arrays since import (xp.asarray of host data, a.set(...))."""
    return _totals["uploads"]


@_contextlib.contextmanager
def track():
    """``with track() as t:`` records every sync (``t.syncs``) and upload (``t.uploads``) made in the block."""
    t = Traffic()
    _trackers.append(t)
    try:
        yield t
    finally:
        _trackers.remove(t)


@_contextlib.contextmanager
def no_syncs():
    """``with no_syncs():`` raises HostSyncError at the first device -> host sync in the block."""
    _forbidding[0] += 1
    try:
        yield
    finally:
        _forbidding[0] -= 1


_SKIP_FILES = (__file__, _os.path.join(_os.path.dirname(_os.path.dirname(__file__)), "xp.py"))


def _where():
    """file:line (function) of the first caller outside this module and xp.py (to_numpy, to_device)."""
    f = _sys._getframe(1)
    while f is not None and f.f_code.co_filename in _SKIP_FILES:
        f = f.f_back
    return "?" if f is None else f"{f.f_code.co_filename}:{f.f_lineno} ({f.f_code.co_name})"


def _sync(kind, a):
    what = f"{kind} of a {a.dtype} array of shape {a.shape} at {_where()}"
    _totals["syncs"] += 1
    for t in _trackers:
        t.syncs.append(what)
    if _forbidding[0]:
        raise HostSyncError(f"device -> host sync inside no_syncs(): {what}")


def _upload(obj, dtype=None, order="K", ndmin=0):
    """A device copy of host data (a real transfer copies: later writes to the host array do not reach it)."""
    a = _np.array(obj, dtype=dtype, order=order, copy=True, ndmin=ndmin)
    if a.dtype == object:
        raise TypeError(f"Unsupported dtype object: device arrays hold numbers only (got {type(obj).__name__})")
    what = f"upload of a {a.dtype} array of shape {a.shape} at {_where()}"
    _totals["uploads"] += 1
    for t in _trackers:
        t.uploads.append(what)
    return a


# ----------------------------------------------------------------------------------------------------------------
# unwrapping arguments, wrapping results
# ----------------------------------------------------------------------------------------------------------------
def _unwrap(x, where):
    """StrictArray -> its buffer, recursively through lists and tuples; a host array is refused."""
    if type(x) is StrictArray:
        return x._a
    if isinstance(x, _np.ndarray):
        raise _mixing(x, where)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v, where) for v in x)
    return x


def _wrap(r):
    """ndarray -> StrictArray, numpy scalar -> 0-d StrictArray (as CuPy returns), recursively through lists/tuples."""
    if isinstance(r, _np.ndarray):
        return StrictArray._of(r)
    if isinstance(r, _np.generic):
        return StrictArray._of(_np.asarray(r))
    if type(r) in (list, tuple):
        return type(r)(_wrap(v) for v in r)
    return r


def _operand(x, where):
    """An operand of a ufunc or operator: a StrictArray's buffer or a scalar; None for an unknown type."""
    if type(x) is StrictArray:
        return x._a
    if isinstance(x, _np.ndarray):
        raise _mixing(x, where)
    if isinstance(x, (_numbers.Number, _np.generic)):
        return x
    if isinstance(x, (list, tuple)):
        raise TypeError(f"Unsupported type {type(x)} in {where}: device ufuncs take device arrays and scalars only "
                        f"(as CuPy's); move host data to the device first with minidit.xp.to_device(x, xp)")
    return None


def _index(key):
    """An index: StrictArrays unwrapped (in tuples and lists too); host index arrays refused."""
    if type(key) is StrictArray:
        return key._a
    if isinstance(key, _np.ndarray):
        raise _mixing(key, "a host array used as an index of a device array")
    if type(key) in (tuple, list):
        return type(key)(_index(k) for k in key)
    return key


# ----------------------------------------------------------------------------------------------------------------
# the array
# ----------------------------------------------------------------------------------------------------------------
_OPERATOR_UFUNCS = frozenset([
    _np.add, _np.subtract, _np.multiply, _np.true_divide, _np.floor_divide, _np.remainder, _np.power, _np.matmul,
    _np.bitwise_and, _np.bitwise_or, _np.bitwise_xor, _np.left_shift, _np.right_shift,
    _np.less, _np.less_equal, _np.equal, _np.not_equal, _np.greater, _np.greater_equal,
])
_COMPARISONS = frozenset([_np.less, _np.less_equal, _np.equal, _np.not_equal, _np.greater, _np.greater_equal])


class StrictArray:
    """A device-like array: a numpy array that refuses to meet numpy (see the module docstring).

    ``StrictArray(shape, dtype)`` allocates an uninitialised array, like ``cupy.ndarray(shape, dtype)``; arrays are
    normally made with ``strict.asarray`` / ``strict.zeros`` / ... or ``minidit.xp.to_device(host, strict)``.
    """

    __slots__ = ("_a",)
    __hash__ = None  # mutable, like ndarray
    __minidit_xp__ = None  # the array module, read by minidit.xp.get_xp; set to this module below

    def __init__(self, shape, dtype=float):
        self._a = _np.empty(shape, dtype=dtype)

    @classmethod
    def _of(cls, a):
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # -- the NumPy protocols: every implicit route to the host is refused --------------------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_function__(self, func, types, args, kwargs):
        raise _numpy_call(func.__name__)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if (method == "__call__" and not kwargs and len(inputs) == 2 and ufunc in _OPERATOR_UFUNCS
                and type(inputs[1]) is StrictArray and (isinstance(inputs[0], _np.generic) or (
                    ufunc in _COMPARISONS and isinstance(inputs[0], _np.ndarray) and inputs[0].ndim == 0))):
            # np.float32(2) * a: NumPy turns a scalar's operator into this ufunc call (a comparison, np.float32(2) < a,
            # arrives with the scalar made a 0-d array); CuPy computes these on the device
            return _wrap(ufunc(inputs[0], inputs[1]._a))
        out = kwargs.get("out", ())
        for x in inputs + (out if isinstance(out, tuple) else (out,)):
            if isinstance(x, _np.ndarray):
                raise _mixing(x, f"numpy.{ufunc.__name__} with a host array and a device array")
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        raise _numpy_call(name)

    # -- metadata: lives on the host, free to read -------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: StrictArray._of(self._a.T))

    def __len__(self):
        if self._a.ndim == 0:
            raise TypeError("len() of unsized object")
        return self._a.shape[0]

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __repr__(self):  # for debugging: not counted as a sync
        return "strict." + repr(self._a)

    # -- explicit transfers and host reads (each one counted as a sync) ---------------------------------------------
    def get(self, stream=None, order="C", out=None, blocking=True):
        """The data as a new host numpy array (or copied into the host array ``out``), as ``cupy.ndarray.get``."""
        _sync("get()", self)
        if out is None:
            return _np.array(self._a, order=order, copy=True)
        if not isinstance(out, _np.ndarray):
            raise TypeError(f"get(out=...) needs a host numpy array, got {type(out).__name__}")
        out[...] = self._a
        return out

    def set(self, arr, stream=None):
        """Copy the host array ``arr`` (same shape) into this array, as ``cupy.ndarray.set``."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError(f"set() takes a host numpy array, got {type(arr).__name__}")
        if arr.shape != self._a.shape:
            raise ValueError(f"set(): shape mismatch, {arr.shape} into {self._a.shape}")
        self._a[...] = _upload(arr)

    def item(self, *args):
        _sync("item()", self)
        return self._a.item(*args)

    def tolist(self):
        _sync("tolist()", self)
        return self._a.tolist()

    def __float__(self):
        _sync("float()", self)
        return float(self._a)

    def __int__(self):
        _sync("int()", self)
        return int(self._a)

    def __complex__(self):
        _sync("complex()", self)
        return complex(self._a)

    def __bool__(self):
        _sync("bool()", self)
        return bool(self._a)

    def __index__(self):
        _sync("index()", self)
        return self._a.__index__()

    def __str__(self):
        _sync("str()", self)
        return str(self._a)

    def __format__(self, spec):
        if not spec:
            return str(self)
        _sync("format()", self)
        return format(self._a, spec)

    # -- copies, casts, views ---------------------------------------------------------------------------------------
    def copy(self, order="C"):
        return StrictArray._of(self._a.copy(order=order))

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        r = self._a.astype(dtype, order=order, casting=casting, subok=subok, copy=copy)
        return self if r is self._a else StrictArray._of(r)

    # -- indexing ---------------------------------------------------------------------------------------------------
    def __getitem__(self, key):
        k = _index(key)
        if _is_bool_mask(k):
            _sync("boolean-mask indexing (the result size is read on the host)", self)
        r = self._a[k]
        if isinstance(r, _np.generic):  # a[i, j]: a 0-d view, as CuPy returns, instead of a host scalar
            kt = k if type(k) is tuple else (k,)
            r = self._a[kt + (Ellipsis,)] if not any(e is Ellipsis for e in kt) else _np.asarray(r)
        return StrictArray._of(r)

    def __setitem__(self, key, value):
        k = _index(key)
        if type(value) is StrictArray:
            v = value._a
        elif isinstance(value, _np.ndarray):
            raise _mixing(value, "assigning a host array into a device array")
        elif isinstance(value, (_numbers.Number, _np.generic)):
            v = value
        else:
            raise TypeError(f"Unsupported type {type(value)} assigned into a device array: assign a device array or "
                            f"a scalar (make one with xp.asarray)")
        self._a[k] = v

    def __getattr__(self, name):  # only reached for names the class does not define
        raise AttributeError(f"'StrictArray' object has no attribute {name!r}: minidit.dev.strict emulates the part of "
                             f"the ndarray API minidit uses; add it to minidit/strict.py (after checking that "
                             f"cupy.ndarray has it)")


def _is_bool_mask(k):
    items = k if type(k) is tuple else (k,)
    return any(isinstance(e, _np.ndarray) and e.dtype == _np.bool_ for e in items)


def _binary(ufunc, name):
    where = f"the operator '{name}'"

    def op(self, other):
        o = _operand(other, where)
        return NotImplemented if o is None else _wrap(ufunc(self._a, o))

    def rop(self, other):
        o = _operand(other, where)
        return NotImplemented if o is None else _wrap(ufunc(o, self._a))

    def iop(self, other):  # really in place: the result is written into this array's buffer
        o = _operand(other, where)
        if o is None:
            return NotImplemented
        ufunc(self._a, o, out=self._a)
        return self

    return op, rop, iop


for _name, _uf in [("add", _np.add), ("sub", _np.subtract), ("mul", _np.multiply), ("truediv", _np.true_divide),
                   ("floordiv", _np.floor_divide), ("mod", _np.remainder), ("pow", _np.power),
                   ("matmul", _np.matmul), ("and", _np.bitwise_and), ("or", _np.bitwise_or),
                   ("xor", _np.bitwise_xor), ("lshift", _np.left_shift), ("rshift", _np.right_shift)]:
    _op, _rop, _iop = _binary(_uf, _name)
    setattr(StrictArray, f"__{_name}__", _op)
    setattr(StrictArray, f"__r{_name}__", _rop)
    setattr(StrictArray, f"__i{_name}__", _iop)

for _name, _uf in [("lt", _np.less), ("le", _np.less_equal), ("eq", _np.equal), ("ne", _np.not_equal),
                   ("gt", _np.greater), ("ge", _np.greater_equal)]:
    setattr(StrictArray, f"__{_name}__", _binary(_uf, _name)[0])

for _name, _uf in [("neg", _np.negative), ("pos", _np.positive), ("abs", _np.absolute), ("invert", _np.invert)]:
    setattr(StrictArray, f"__{_name}__", (lambda uf: lambda self: _wrap(uf(self._a)))(_uf))


def _method(name):
    def method(self, *args, **kwargs):
        out = kwargs.get("out")
        r = getattr(self._a, name)(*_unwrap(args, f"ndarray.{name}"),
                                   **{k: _unwrap(v, f"ndarray.{name}") for k, v in kwargs.items()})
        return out if out is not None else _wrap(r)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"ndarray.{name} on the device (full reductions give 0-d arrays)."
    return method


for _name in ("reshape", "transpose", "swapaxes", "squeeze", "ravel", "flatten", "repeat", "take", "diagonal",
              "sum", "mean", "std", "var", "prod", "max", "min", "argmax", "argmin", "any", "all", "cumsum", "cumprod",
              "clip", "round", "dot", "conj", "fill", "sort", "argsort", "trace"):
    setattr(StrictArray, _name, _method(_name))



def _nonzero(self):
    _sync("nonzero() (the result size is read on the host)", self)
    return _wrap(self._a.nonzero())


StrictArray.nonzero = _nonzero
ndarray = StrictArray


# ----------------------------------------------------------------------------------------------------------------
# the array module: explicit transfers, then numpy's namespace wrapped on first use (module __getattr__)
# ----------------------------------------------------------------------------------------------------------------
def asarray(a, dtype=None, order=None):
    """As cupy.asarray: a device array stays itself (cast if needed); host data is copied to the device."""
    if type(a) is StrictArray:
        r = _np.asarray(a._a, dtype=dtype, order=order)
        return a if r is a._a else StrictArray._of(r)
    return StrictArray._of(_upload(a, dtype=dtype, order=order or "K"))


def array(obj, dtype=None, copy=True, order="K", ndmin=0):
    """As cupy.array: a copy on the device (of device or host data)."""
    if type(obj) is StrictArray:
        r = _np.array(obj._a, dtype=dtype, copy=copy, order=order, ndmin=ndmin)
        return obj if r is obj._a else StrictArray._of(r)
    return StrictArray._of(_upload(obj, dtype=dtype, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None):
    """As cupy.asnumpy: the data on the host (a sync for a device array)."""
    if type(a) is StrictArray:
        return a.get(order=order, out=out)
    return _np.asarray(a, order=order)


def get_array_module(*args):
    """As cupy.get_array_module: this module if any argument is a strict array, else numpy."""
    return _sys.modules[__name__] if any(type(a) is StrictArray for a in args) else _np


StrictArray.__minidit_xp__ = _sys.modules[__name__]

_DATA_DEPENDENT_SIZE = frozenset(["nonzero", "flatnonzero", "argwhere", "unique", "extract", "compress"])
_BOOL_RESULTS = frozenset(["allclose", "array_equal", "array_equiv"])  # Python bools in numpy, 0-d arrays in CuPy
_HOST_ONLY = frozenset(["save", "savez", "savez_compressed", "load", "loadtxt", "savetxt", "genfromtxt", "fromfile",
                        "frombuffer", "fromstring", "fromiter", "set_printoptions", "printoptions"])


def _device_function(name, fn):
    """numpy function ``fn`` on device arrays: arguments unwrapped (host arrays refused), results wrapped."""

    def f(*args, **kwargs):
        where = f"{name}() with a host array argument"
        if name in _DATA_DEPENDENT_SIZE or (name == "where" and len(args) + len(kwargs) == 1):
            for a in args:
                if type(a) is StrictArray:
                    _sync(f"{name}() (the result size is read on the host)", a)
                    break
        out = kwargs.get("out")
        r = fn(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()})
        if out is not None:
            return out[0] if type(out) is tuple and len(out) == 1 else out
        if name in _BOOL_RESULTS:
            return StrictArray._of(_np.asarray(r))
        return _wrap(r)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"numpy.{name} on minidit.dev.strict arrays (host arrays refused; results are strict arrays)."
    return f


class _DeviceUfunc:
    """A numpy ufunc on device arrays; ``out`` (keyword or positional) must be a StrictArray and is returned."""

    def __init__(self, ufunc):
        self._uf = ufunc
        self.__name__ = ufunc.__name__
        self.nin, self.nout, self.nargs = ufunc.nin, ufunc.nout, ufunc.nargs

    def __call__(self, *args, **kwargs):
        inputs, outs = args[:self.nin], args[self.nin:]
        if outs:
            if "out" in kwargs:
                raise TypeError(f"{self.__name__}: out given both positionally and as a keyword")
            kwargs["out"] = outs if len(outs) > 1 else outs[0]
        where = f"{self.__name__}()"
        ins = []
        for x in inputs:
            o = _operand(x, where)
            if o is None:
                raise TypeError(f"Unsupported type {type(x)} in {where}")
            ins.append(o)
        out = kwargs.get("out")
        for o in () if out is None else out if type(out) is tuple else (out,):
            if isinstance(o, _np.ndarray):
                raise _mixing(o, f"a host array as out= of {where}")
            if type(o) is not StrictArray:
                raise TypeError(f"Unsupported type {type(o)} as out= of {where}")
        r = self._uf(*ins, **{k: _unwrap(v, where) for k, v in kwargs.items()})
        if out is not None:
            return out[0] if type(out) is tuple and len(out) == 1 else out
        return _wrap(r)

    def __getattr__(self, name):  # reduce, accumulate, outer, at, identity, types, ...
        attr = getattr(self._uf, name)
        return _device_function(f"{self.__name__}.{name}", attr) if callable(attr) else attr

    def __repr__(self):
        return f"<minidit.dev.strict ufunc '{self.__name__}'>"


class _Namespace:
    """A numpy submodule (linalg, fft) with its functions wrapped like the top level's."""

    def __init__(self, module, name):
        self._module, self._name = module, name

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        if callable(obj) and not isinstance(obj, type):
            obj = _device_function(f"{self._name}.{name}", obj)
        setattr(self, name, obj)
        return obj


class Generator:
    """As cupy.random.Generator: numpy's Generator (same streams for the same seed) drawing StrictArrays."""

    def __init__(self, seed=None):
        self._g = _np.random.default_rng(seed)

    def __getattr__(self, name):
        attr = getattr(self._g, name)
        if name.startswith("_") or not callable(attr):
            raise AttributeError(f"minidit.dev.strict Generator does not emulate {name!r}; it offers numpy Generator's "
                                 f"drawing methods (random, standard_normal, integers, ...)")

        def draw(*args, **kwargs):
            where = f"Generator.{name}() with a host array argument"
            out = kwargs.get("out")
            r = attr(*_unwrap(args, where), **{k: _unwrap(v, where) for k, v in kwargs.items()})
            if out is not None:
                return out
            if isinstance(r, _np.ndarray):
                return StrictArray._of(r)
            if r is None:  # in-place methods (shuffle)
                return r
            return StrictArray._of(_np.asarray(r, dtype=kwargs.get("dtype")))  # a draw of size None: 0-d

        draw.__name__ = name
        return draw


class _Random:
    """``xp.random``: ``default_rng(seed)`` (what minidit.backend.make_rng uses) and ``Generator``."""

    Generator = Generator

    @staticmethod
    def default_rng(seed=None):
        return Generator(seed)

    def __getattr__(self, name):
        raise AttributeError(f"minidit.dev.strict.random.{name} is not emulated: device random numbers come from "
                             f"xp.random.default_rng(seed) (minidit.backend.make_rng)")


random = _Random()

_PASS_TYPES = (_np.dtype, _np.finfo, _np.iinfo)
_SUBMODULES = ("linalg", "fft")


def __getattr__(name):
    """numpy's namespace, wrapped for device arrays on first use and then cached in this module."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        obj = getattr(_np, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (numpy has none either)") from None
    if isinstance(obj, _np.ufunc):
        value = _DeviceUfunc(obj)
    elif isinstance(obj, type):  # dtypes and scalar types pass through; other classes are host-side machinery
        if not (issubclass(obj, _np.generic) or obj in _PASS_TYPES):
            raise AttributeError(f"minidit.dev.strict does not emulate numpy.{name} (a class); add it to "
                                 f"minidit/strict.py if device code needs it")
        value = obj
    elif obj is None or isinstance(obj, (bool, int, float, complex)):  # newaxis, pi, e, inf, nan
        value = obj
    elif isinstance(obj, _types.ModuleType):
        if name not in _SUBMODULES:
            raise AttributeError(f"minidit.dev.strict does not emulate numpy.{name}; it wraps numpy's functions and "
                                 f"{', '.join(_SUBMODULES)}, random")
        value = _Namespace(obj, name)
    elif callable(obj) and name not in _HOST_ONLY:
        value = _device_function(name, obj)
    else:
        raise AttributeError(f"minidit.dev.strict does not emulate numpy.{name}: it works on host data (use numpy with "
                             f"minidit.xp.to_numpy / to_device at the edges)")
    globals()[name] = value
    return value
