"""Fused elementwise kernels behind ``quantize``, ``dequantize`` and ``fake_quantize``.

Each kernel is one plain torch function that writes into preallocated outputs. That function is
the *eager* path (always available, always correct, used for small tensors); for large tensors
the same function runs compiled by ``torch.compile`` (Inductor generates one vectorized,
multithreaded C++ loop on CPU, a Triton kernel on CUDA) instead of one memory pass per torch op.
Both evaluate the same IEEE-754 operations in the same order (true division, round half to even,
add, clamp, convert), so compiled and eager results are bit-identical; the tests check it.

The formulas (ONNX QuantizeLinear / DequantizeLinear)::

    v = round_half_even(x / s) + z         q = clamp(v, qmin, qmax)
    quantize:       q  (integer dtype)
    dequantize:     (q - z) * s
    fake_quantize:  (q - z) * s,   and for the clipped STE the 1-byte mask  v == q  ("not saturated")
    clipped STE backward:  grad * mask

Switches, read at every call:

* ``LOWBIT_COMPILE=0`` never compiles (eager only);
* ``LOWBIT_COMPILE_MIN_NUMEL=N`` compiles for tensors of at least ``N`` elements (default 2**22).

If compiling fails (no C++ compiler, an unsupported platform) the failure is logged once and that
kernel stays eager. Large CPU outputs are allocated with transparent huge pages advised
(``madvise(MADV_HUGEPAGE)`` on Linux): first-touch page faults otherwise cost more than the
arithmetic (what ``THP_MEM_ALLOC_ENABLE=1`` does for all of PyTorch).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Callable

import torch

__all__ = ["quantize", "dequantize", "fake_quantize", "mask_grad", "empty", "use_compiled",
           "DEFAULT_MIN_NUMEL"]

log = logging.getLogger(__name__)

DEFAULT_MIN_NUMEL = 1 << 22


# --------------------------------------------------------------------------- eager kernels
# Written once; compiled as they are. Bounds come as 0-d tensors so that one compiled graph
# serves every spec (Python numbers would be specialized into the code).

def _quantize_into(x, s, z, lo, hi, out):
    v = x.to(s.dtype) / s
    v.round_().add_(z).clamp_(lo, hi)
    out.copy_(v)
    return v.amax()  # NaN iff some x was NaN (max propagates NaN; v is otherwise finite)


def _fake_quantize_into(x, s, z, lo, hi, out):
    out.copy_(x)  # exact conversion to the compute dtype; then everything happens in ``out``
    out.div_(s).round_().add_(z).clamp_(lo, hi).sub_(z).mul_(s)


def _fake_quantize_mask_into(x, s, z, lo, hi, out, mask):
    out.copy_(x)
    out.div_(s).round_().add_(z)
    # v == clamp(v) exactly when lo <= v <= hi (NaN: neither); uint8 0/1, which Inductor
    # vectorizes (a bool store it does not)
    mask.copy_(torch.where((out >= lo) & (out <= hi), 1.0, 0.0))
    out.clamp_(lo, hi).sub_(z).mul_(s)


def _dequantize_into(q, s, z, out):
    out.copy_(q)
    out.sub_(z).mul_(s)  # q - z is an integer below 2^17: exact in float32


def _mask_grad_into(grad, mask, out):
    out.copy_(mask)
    out.mul_(grad)


_EAGER: dict[str, Callable] = {
    "quantize": _quantize_into,
    "fake_quantize": _fake_quantize_into,
    "fake_quantize_mask": _fake_quantize_mask_into,
    "dequantize": _dequantize_into,
    "mask_grad": _mask_grad_into,
}
_COMPILED: dict[str, Callable] = {}
_FAILED: set[str] = set()


def _min_numel() -> int:
    raw = os.environ.get("LOWBIT_COMPILE_MIN_NUMEL")
    if raw is None:
        return DEFAULT_MIN_NUMEL
    try:
        return int(raw)
    except ValueError:
        log.warning("LOWBIT_COMPILE_MIN_NUMEL=%r is not an integer; using %d", raw, DEFAULT_MIN_NUMEL)
        return DEFAULT_MIN_NUMEL


def use_compiled(name: str, x: torch.Tensor) -> bool:
    """Whether kernel ``name`` runs compiled for ``x`` (see the module docstring for the rules)."""
    if os.environ.get("LOWBIT_COMPILE", "1") == "0" or name in _FAILED:
        return False
    if x.numel() < max(_min_numel(), 1) or x.device.type not in ("cpu", "cuda"):
        return False
    if torch.compiler.is_compiling():  # inside a user's torch.compile: let it trace the eager code
        return False
    return not (sys.platform == "win32" and x.device.type == "cpu")


def _run(name: str, big: torch.Tensor, *args):
    """Run kernel ``name`` compiled if :func:`use_compiled` says so, else eagerly; returns its result."""
    if use_compiled(name, big):
        fn = _COMPILED.get(name)
        if fn is None:
            fn = _COMPILED[name] = torch.compile(_EAGER[name], dynamic=True, fullgraph=True)
        try:
            with torch.no_grad():
                return fn(*args)
        except Exception as e:  # a missing compiler, an unsupported backend: stay correct, go eager
            _FAILED.add(name)
            log.warning("lowbit: compiling kernel %r failed (%s: %s); using the eager kernel",
                        name, type(e).__name__, e)
    with torch.no_grad():
        return _EAGER[name](*args)


# --------------------------------------------------------------------------- huge-page outputs
_HUGE = 2 << 20
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``; a large CPU buffer gets ``MADV_HUGEPAGE`` on its 2 MiB-aligned interior."""
    out = torch.empty(shape, dtype=dtype, device=device)
    nbytes = out.numel() * out.element_size()
    if (_madvise is not None and out.device.type == "cpu" and nbytes >= 4 * _HUGE
            and not torch.compiler.is_compiling()):
        start = -(-out.data_ptr() // _HUGE) * _HUGE
        end = (out.data_ptr() + nbytes) // _HUGE * _HUGE
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)  # advisory: a failure changes nothing
    return out


def _bounds(lo: int, hi: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(float(lo), dtype=like.dtype, device=like.device),
            torch.tensor(float(hi), dtype=like.dtype, device=like.device))


def _broadcast_shape(x: torch.Tensor, *params: torch.Tensor) -> torch.Size:
    return torch.broadcast_shapes(x.shape, *(p.shape for p in params))


# --------------------------------------------------------------------------- public kernels
def quantize(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Codes ``clamp(round(x/s) + z, qmin, qmax)`` as ``dtype`` and whether ``x`` held a NaN.

    ``s`` and ``z`` (float, compute dtype) broadcast against ``x`` without enlarging it. The NaN
    check is a max-reduction inside the same kernel (one more read of ``x``, no extra launch).
    """
    out = empty(_broadcast_shape(x, s, z), dtype, x.device)
    if out.numel() == 0:
        return out, False
    lo, hi = _bounds(qmin, qmax, s)
    flag = _run("quantize", x, x, s, z, lo, hi, out)
    return out, bool(torch.isnan(flag))


def fake_quantize(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                  want_mask: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(clamp(round(x/s) + z) - z) * s`` in ``s``'s dtype and, if asked for, the uint8 mask
    ``v == q`` (1 where ``x`` was not saturated)."""
    shape = _broadcast_shape(x, s, z)
    out = empty(shape, s.dtype, x.device)
    lo, hi = _bounds(qmin, qmax, s)
    if not want_mask:
        _run("fake_quantize", x, x, s, z, lo, hi, out)
        return out, None
    mask = empty(shape, torch.uint8, x.device)
    _run("fake_quantize_mask", x, x, s, z, lo, hi, out, mask)
    return out, mask


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``(q - z) * s`` in ``s``'s dtype; ``z`` (integral, in ``s``'s dtype) broadcasts against ``q``."""
    out = empty(_broadcast_shape(q, s, z), s.dtype, q.device)
    _run("dequantize", q, q, s, z, out)
    return out


def mask_grad(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``grad * mask`` for the 0/1 mask of :func:`fake_quantize` (a NaN gradient stays NaN, as in torch)."""
    out = empty(grad.shape, grad.dtype, grad.device)
    _run("mask_grad", grad, grad, mask, out)
    return out
