"""Propagation rules of the certified error bound, one per kind of graph node.

Each value of the network is carried as a pair ``(a, E)``: ``a`` the activation of the float
network (BatchNorm folded, computed in float64) and ``E >= 0`` an elementwise bound on how far the
quantized network's value ``a^`` (computed by ``q`` in float32) can be from it: ``|a^ - a| <= E``.
The rules (``u`` the unit roundoff of ``q``'s arithmetic, ``n`` a layer's fan-in)::

    input quantizer Q (monotone)   Q(a^) in [Q(lo), Q(hi)],  lo/hi = a -/+ E rounded outwards to float32
                                   E_in = max(|Q(hi) - a|, |Q(lo) - a|)     (rounding AND clipping, exact)
    Linear / Conv  (W_q = W + dW)  W_q Q(a^) - W a = W_q (Q(a^) - a) + dW a
                                   E' = |W_q| E_in + |dW a| + g_n (|W_q| (|a| + E_in) + |b|)
    monotone f (ReLU, ReLU6,       E' = max(|f(a + E) - f(a)|, |f(a - E) - f(a)|)  (+ roundoff of f)
      Hardtanh, LeakyReLU, Sigmoid, Tanh, clamp)
    max pooling                    E' = maxpool(E)        (|max a^ - max a| <= max |a^ - a|)
    average pooling / BatchNorm    the same linear map on E with |coefficients| (+ roundoff)
    residual add / sub             E' = E_1 + E_2 (+ u |sum|);   product  |a_1| E_2 + |a_2| E_1 + E_1 E_2
    reshape / flatten / cat / Identity / Dropout (eval)          E' = the same view of E

The activation errors are adversarial (any value within their bound, with any signs), which is
what makes the certificate hold however the errors of the layers combine; the weight term is exact
(``dW`` and ``a`` are known, so ``dW a`` is computed, signed, before taking its magnitude).
With ``g_n = 4 (n + 1) u / (1 - (n + 1) u)`` (Higham, "Accuracy and Stability of Numerical
Algorithms", 2002, Sec. 3.1, the dot-product error bound, with a factor 4 of margin for blocked
and transformed convolution algorithms). This is interval arithmetic on the error, as in the
abstract-interpretation verifiers of neural networks (Gehr et al., "AI2", IEEE S&P 2018), applied
to the quantized-vs-float difference; the seed is the per-neuron bound
``|dz| <= sum_i |w_i| |e_i|`` plus the weight-error and activation-rounding terms.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import ActQuantizer, QuantLayer
from .. import ops

__all__ = ["Unsupported", "V", "unit_roundoff", "module_rule", "function_rule", "method_rule", "layer_rule",
           "act_quant"]

U64 = 2.0 ** -53


class Unsupported(Exception):
    """A node the propagation cannot bound (the message says why)."""


class V:
    """A propagated value: ``a`` (float64 tensor or a Python value) and its error bound ``e`` (or None)."""

    __slots__ = ("a", "e")

    def __init__(self, a: Any, e: torch.Tensor | None = None) -> None:
        self.a, self.e = a, e

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.a, torch.Tensor)

    def err(self) -> torch.Tensor:
        return self.e if self.e is not None else torch.zeros_like(self.a)


def unit_roundoff(dtype: torch.dtype, device: torch.device, kind: str = "elementwise") -> float:
    """Unit roundoff of ``q``'s arithmetic (TF32 on CUDA and reduced-precision matmul counted)."""
    base = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
            torch.bfloat16: 2.0 ** -8}.get(dtype, 2.0 ** -8)
    if dtype == torch.float32 and kind in ("conv", "linear"):
        if device.type == "cuda":
            tf32 = torch.backends.cudnn.allow_tf32 if kind == "conv" else torch.backends.cuda.matmul.allow_tf32
            if tf32:
                return 2.0 ** -11
        if torch.get_float32_matmul_precision() != "highest":
            return 2.0 ** -8
    return base


def _gamma(n: int, u: float) -> float:
    k = (n + 1) * u
    if k >= 0.5:
        raise Unsupported(f"fan-in {n} is too large for a rounding bound at unit roundoff {u:g}")
    return 4.0 * k / (1.0 - k)


def _finish(a: torch.Tensor, e: torch.Tensor, u: float = 0.0) -> V:
    """Add ``u`` relative roundoff of ``q`` plus float64 slack of our own computation."""
    return V(a, e + (u + 8 * U64) * (a.abs() + e))


# -- elementwise and structural rules -----------------------------------------------------------
def structural(fn: Callable, x: V) -> V:
    return V(fn(x.a), fn(x.err()))


def monotone(fn: Callable, x: V, u: float, exact: bool) -> V:
    a = fn(x.a)
    e = x.err()
    d = torch.maximum((fn(x.a + e) - a).abs(), (fn(x.a - e) - a).abs())
    return _finish(a, d, 0.0 if exact else 4 * u)


def maxpool(fn: Callable, x: V) -> V:
    return _finish(fn(x.a), fn(x.err()))


def avgpool(fn: Callable, x: V, u: float) -> V:
    k = max(1, int(torch.Size(x.a.shape[2:]).numel()))
    e = fn(x.err())
    return _finish(fn(x.a), e + 2 * (k + 1) * u * fn(x.a.abs() + x.err()))


def batchnorm(m: nn.Module, x: V, u: float) -> V:
    if m.training or m.running_mean is None:
        raise Unsupported("BatchNorm in training mode or without running statistics; call model.eval()")
    mean, var = m.running_mean.double(), m.running_var.double()
    w = m.weight.double() if m.weight is not None else torch.ones_like(mean)
    b = m.bias.double() if m.bias is not None else torch.zeros_like(mean)
    scale = w / torch.sqrt(var + m.eps)
    view = [1, -1] + [1] * (x.a.dim() - 2)
    s, sh, mu = scale.reshape(view), b.reshape(view), mean.reshape(view)
    a = (x.a - mu) * s + sh
    e = x.err() * s.abs()
    mag = (x.a.abs() + x.err() + mu.abs()) * s.abs() + sh.abs()
    return _finish(a, e + 8 * u * mag)


def arith(op: Callable, x: V, y: V, u: float) -> V:
    if op in (operator.add, operator.sub, torch.add, torch.sub, operator.iadd, operator.isub):
        a = op(x.a, y.a)
        e = _broad(x, a) + _broad(y, a)
        return _finish(a, e, u)
    if op in (operator.mul, torch.mul, operator.imul):
        a = x.a * y.a
        ex, ey = _broad(x, a), _broad(y, a)
        e = _abs(x.a) * ey + _abs(y.a) * ex + ex * ey
        return _finish(a, e, u)
    if op in (operator.truediv, torch.div, operator.itruediv):
        if y.e is not None and bool((y.e > 0).any()):
            raise Unsupported("division by a tensor that carries quantization error")
        a = x.a / y.a
        return _finish(a, _broad(x, a) / _abs(y.a), u)
    raise Unsupported(f"arithmetic {op}")


def _abs(v: Any) -> Any:
    return v.abs() if isinstance(v, torch.Tensor) else abs(v)


def _broad(v: V, like: torch.Tensor) -> torch.Tensor:
    if v.e is None:
        return torch.zeros_like(like)
    return v.e.expand_as(like) if v.e.shape != like.shape else v.e


# -- quantized and float layers ------------------------------------------------------------------
def act_quant(aq: ActQuantizer, x: V) -> V:
    """``Q(a^)`` bounded through the quantizer's monotonicity (rounding and clipping, exactly)."""
    if not aq.enabled or not x.a.is_floating_point():
        return x
    if aq.observing:
        raise Unsupported("activation quantizer is still observing (inside lb.calibrate)")
    if aq.spec.dynamic:
        raise Unsupported(f"dynamic activation quantization ({aq.spec}) has an input-dependent grid")
    if aq.scale is None:
        return x  # uncalibrated: float pass-through
    spec = aq.spec.replace(rounding="nearest")
    e = x.err()
    lo, hi = _round32(x.a - e, down=True), _round32(x.a + e, down=False)
    qlo = ops.fake_quantize(lo, spec, aq.scale, aq.zero_point).double()
    qhi = ops.fake_quantize(hi, spec, aq.scale, aq.zero_point).double()
    d = torch.maximum((qhi - x.a).abs(), (qlo - x.a).abs())
    return V(x.a, d + 8 * U64 * (x.a.abs() + d))


def _round32(v: torch.Tensor, down: bool) -> torch.Tensor:
    """``v`` (float64) rounded to float32 towards -inf (``down``) or +inf."""
    f = v.float()
    if down:
        return torch.where(f.double() > v, torch.nextafter(f, torch.full_like(f, -torch.inf)), f)
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, torch.inf)), f)


def layer_rule(op: Callable, w_float: torch.Tensor, w_quant: torch.Tensor, bias: torch.Tensor | None,
               x: V, u: float) -> V:
    """``op(x, W_q, b)`` against ``op(x, W, b)`` (``op`` a linear or convolution)."""
    wf, wq = w_float.double(), w_quant.double()
    b = None if bias is None else bias.detach().double()
    awq, adw = wq.abs(), (wq - wf).abs()
    n = int(wq[0].numel())
    g32, g64 = _gamma(n, u), _gamma(n, U64)
    a = op(x.a, wf, b)
    t1 = op(x.err(), awq, None)                                   # |W_q| E_in
    mag = op(x.a.abs(), awq, None)                                # |W_q| |a|
    if bool((adw > 0).any()):      # the weight error acts on the known float input: |dW a|, exactly
        t2, dwa = op(x.a.abs(), adw, None), op(x.a, wq - wf, None).abs()
    else:
        t2 = dwa = torch.zeros_like(a)
    e = t1 + dwa + g32 * (mag + t1) + g64 * (mag + 2 * t2)
    if b is not None:
        ab = b.abs().reshape([1, -1] + [1] * (a.dim() - 2)) if w_float.dim() > 2 else b.abs()
        e = e + (g32 + g64) * ab
    return _finish(a, e)


def _float_op(m: nn.Module) -> Callable:
    if isinstance(m, nn.Linear):
        return F.linear
    return m._conv_forward


# -- dispatch ------------------------------------------------------------------------------------
_MONOTONE_MODULES = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)  # ReLU6 is a Hardtanh
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_FLOAT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def module_rule(m: nn.Module, pairs: dict, name: str, dtype: torch.dtype, device: torch.device) -> Callable[[V], V]:
    """The rule for ``call_module`` of ``m``, or raise :class:`Unsupported`."""
    u = unit_roundoff(dtype, device)
    if isinstance(m, QuantLayer):
        wf, wq = pairs[name]
        kind = "linear" if wq.dim() == 2 else "conv"
        ul = unit_roundoff(dtype, device, kind)
        aq = m.input_quant
        return lambda x: layer_rule(m.op, wf, wq, m.bias, act_quant(aq, x) if aq is not None else x, ul)
    if isinstance(m, ActQuantizer):
        return lambda x: act_quant(m, x)
    if type(m) in _FLOAT_LAYERS:
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        ul = unit_roundoff(dtype, device, kind)
        if kind == "conv" and m.padding_mode != "zeros":
            raise Unsupported(f"{type(m).__name__} with padding_mode={m.padding_mode!r}")
        return lambda x: layer_rule(_float_op(m), m.weight.detach(), m.weight.detach(), m.bias, x, ul)
    if isinstance(m, _IDENTITY_MODULES):
        if isinstance(m, nn.Identity) or not m.training or m.p == 0:
            return lambda x: x
        raise Unsupported(f"{type(m).__name__} in training mode; call model.eval()")
    if isinstance(m, _MONOTONE_MODULES):
        if isinstance(m, nn.LeakyReLU) and m.negative_slope < 0:
            raise Unsupported("LeakyReLU with a negative slope is not monotone")
        exact = isinstance(m, (nn.ReLU, nn.Hardtanh))
        return lambda x: monotone(lambda t: m(t), x, u, exact)
    if isinstance(m, _MAXPOOL):
        if getattr(m, "return_indices", False):
            raise Unsupported(f"{type(m).__name__} with return_indices=True")
        return lambda x: maxpool(lambda t: m(t), x)
    if isinstance(m, _AVGPOOL):
        return lambda x: avgpool(lambda t: m(t), x, u)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return lambda x: batchnorm(m, x, u)
    if isinstance(m, (nn.Flatten, nn.Unflatten)):
        return lambda x: structural(lambda t: m(t), x)
    raise Unsupported(f"{type(m).__name__} has no bound propagation rule")


_STRUCT_FUNCS = {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute}
_STRUCT_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_VALUE_METHODS = {"size", "dim", "numel"}
_MONO_FUNCS = {F.relu: True, torch.relu: True, F.relu6: True, F.hardtanh: True, torch.clamp: True,
               F.leaky_relu: False, torch.sigmoid: False, torch.tanh: False, F.sigmoid: False, F.tanh: False}
_MONO_METHODS = {"relu": True, "clamp": True, "sigmoid": False, "tanh": False}
_ARITH = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
          operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_MAXPOOL_F = {F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d}
_AVGPOOL_F = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
_ARITH_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}


def function_rule(fn: Any, args: tuple, kwargs: dict, u: float) -> Callable[..., V] | None:
    """Rule for ``call_function``; returns a callable of the resolved first-tensor V, or None if generic."""
    if fn in _ARITH:
        if "alpha" in kwargs:
            raise Unsupported(f"{getattr(fn, '__name__', fn)} with alpha")
        return "arith"
    if fn is operator.neg:
        return lambda x, rest, kw: V(-x.a, x.e)
    if fn in _STRUCT_FUNCS:
        return lambda x, rest, kw: structural(lambda t: fn(t, *rest, **kw), x)
    if fn is torch.cat:
        return "cat"
    if fn in _MONO_FUNCS:
        if fn is F.leaky_relu and (args[1:] or [kwargs.get("negative_slope", 0.01)])[0] < 0:
            raise Unsupported("leaky_relu with a negative slope is not monotone")
        return lambda x, rest, kw: monotone(lambda t: fn(t, *rest, **kw), x, u, _MONO_FUNCS[fn])
    if fn in _MAXPOOL_F:
        if kwargs.get("return_indices"):
            raise Unsupported("max pooling with return_indices=True")
        return lambda x, rest, kw: maxpool(lambda t: fn(t, *rest, **kw), x)
    if fn in _AVGPOOL_F:
        return lambda x, rest, kw: avgpool(lambda t: fn(t, *rest, **kw), x, u)
    if fn is F.dropout:
        if kwargs.get("training", args[2] if len(args) > 2 else True):
            raise Unsupported("F.dropout with training=True")
        return lambda x, rest, kw: x
    if fn in (getattr, operator.getitem):
        return "value"
    raise Unsupported(f"function {getattr(fn, '__qualname__', fn)} has no bound propagation rule")


def method_rule(name: str, u: float) -> Callable[..., V] | str:
    """Rule for ``call_method``."""
    if name in _STRUCT_METHODS:
        return lambda x, rest, kw: structural(lambda t: getattr(t, name)(*rest, **kw), x)
    if name in _VALUE_METHODS:
        return "value"
    if name in _MONO_METHODS:
        return lambda x, rest, kw: monotone(lambda t: getattr(t, name)(*rest, **kw), x, u, _MONO_METHODS[name])
    if name in _ARITH_METHODS:
        return "arith"
    raise Unsupported(f"method .{name}() has no bound propagation rule")
