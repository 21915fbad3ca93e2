"""Propagation rules of the certified error bound, one per kind of graph node.

**Forward (interval) pass.** Each value of the network is carried as ``(a, [lo, hi])``: ``a``
the activation of the float network (BatchNorm folded, computed in float64) and an elementwise
interval for the error ``d = a^ - a`` of the quantized network's value ``a^`` (computed by ``q``
in float32): ``lo <= d <= hi`` (``E = max(|lo|, |hi|)``). With ``u`` the unit roundoff of ``q``'s
arithmetic and ``n`` a layer's fan-in::

    input quantizer Q (monotone)   Q(a^) in [Q(a + lo), Q(a + hi)]  (ends rounded outwards to float32):
                                   rounding AND clipping, exactly
    Linear / Conv  (W_q = W + dW)  W_q Q(a^) - W a = W_q (Q(a^) - a) + dW a;  with d_q in [c - r, c + r]
                                   d' in W_q c + dW a -/+ (|W_q| r + g_n (|W_q| (|a| + E_q) + |dW| |a| + |b|))
    monotone f (ReLU, ReLU6, ...)  d' in [f(a + lo) - f(a), f(a + hi) - f(a)]   (+ roundoff of f)
    max pooling                    d' in [max(a + lo) - max a, max(a + hi) - max a]
    average pooling / BatchNorm    the same linear map on the interval (+ roundoff)
    residual add / sub             interval sums (+ u |sum|);   products  |a_1| E_2 + |a_2| E_1 + E_1 E_2
    reshape / flatten / cat / Identity / Dropout (eval)          the same view of the interval

with ``g_n = 4 (n + 1) u / (1 - (n + 1) u)`` (Higham, "Accuracy and Stability of Numerical
Algorithms", 2002, Sec. 3.1, the dot-product error bound, with a factor 4 of margin for blocked
and transformed convolution algorithms). The activation errors are adversarial (any value within
their bound); the weight term is exact (``dW`` and ``a`` are known, so ``dW a`` is computed signed).
This is the seed's per-neuron bound ``|dz| <= sum_i |w_i| |e_i|`` plus the weight-error and
activation-rounding terms, i.e. interval arithmetic on the error (Gehr et al., "AI2", S&P 2018).

**Backward (linear-relaxation) pass.** Every rule also returns how its output error depends on
its input errors (:mod:`.bound_back`), as a linear map plus bounded terms: ``d_out = L(d_in) + c + eta`` with
``|eta| <= slack`` for linear layers, pooling, BatchNorm and reshapes; for ReLU linear upper and
lower bounds ``s_lo d + c_lo <= g(d) <= s_up d + c_up`` of ``g(d) = relu(a + d) - relu(a)`` on
``[lo, hi]`` (the triangle relaxation); for a quantizer ``Q(a^) - a = d_in + rho`` with ``rho`` the
rounding/clipping error bounded from the interval (or the exact constant ``Q - a`` where the
interval cannot change the code). Composing these from the logits back to the input (CROWN,
Zhang et al., NeurIPS 2018) bounds each logit change with the layers' maps multiplied *before*
absolute values are taken, so errors that cancel along the network are not counted twice. A node
without such a map is *concretized* (``|Lambda| E``), which is always sound.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..modules import ActQuantizer
from ..ops.params import broadcast_param
from .bound_back import Chain, Cut, Elementwise, Lin, MaxPoolBack, WindowMaxBack

__all__ = ["Unsupported", "V", "unit_roundoff", "arith", "ROUNDING", "structural", "identity", "monotone", "maxpool",
           "avgpool", "batchnorm", "act_quant", "layer_rule"]

U64 = 2.0 ** -53


class Unsupported(Exception):
    """A node the propagation cannot bound (the message says why)."""


class V:
    """A propagated value: ``a`` (float64 tensor or a Python value) and its error interval ``[lo, hi]``."""

    __slots__ = ("a", "lo", "hi")

    def __init__(self, a: Any, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> None:
        self.a, self.lo, self.hi = a, lo, hi

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.a, torch.Tensor)

    @property
    def exact(self) -> bool:
        return self.lo is None

    def l(self) -> torch.Tensor:
        return self.lo if self.lo is not None else torch.zeros_like(self.a)

    def h(self) -> torch.Tensor:
        return self.hi if self.hi is not None else torch.zeros_like(self.a)

    def err(self) -> torch.Tensor:
        """``E = max(|lo|, |hi|)``."""
        return torch.maximum(self.l().abs(), self.h().abs())


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


def _finish(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, u: float = 0.0) -> tuple[V, torch.Tensor]:
    """``V`` with ``u`` relative roundoff of ``q`` plus float64 slack added on both sides; returns (V, slack)."""
    slack = (u + 8 * U64) * (a.abs() + torch.maximum(lo.abs(), hi.abs()))
    return V(a, lo - slack, hi + slack), slack


def _zero(v: V) -> torch.Tensor:
    return torch.zeros_like(v.a)


# -- elementwise and structural rules -------------------------------------------------------------
def structural(fn: Callable, x: V):
    return V(fn(x.a), fn(x.l()), fn(x.h())), Lin(fn, [_zero(x)])


def identity(x: V):
    return x, Lin(None, [])


def monotone(fn: Callable, x: V, u: float, exact: bool, relu: bool = False):
    """A non-decreasing elementwise ``f``: ``d' in [f(a + lo) - f(a), f(a + hi) - f(a)]``."""
    a = fn(x.a)
    lo, hi = x.l(), x.h()
    glo, ghi = fn(x.a + lo) - a, fn(x.a + hi) - a
    v, slack = _finish(a, glo, ghi, 0.0 if exact else 4 * u)
    # where f is a unit-slope shift on [a + lo, a + hi] (ReLU's or Hardtanh's linear piece),
    # d' = d + (f(a + lo) - a - lo) exactly; elsewhere the constant range [g(lo), g(hi)]
    # (the interval need not contain d = 0: the weight error can shift it)
    width = hi - lo
    ident = (width > 0) & ((ghi - glo - width).abs() <= 1e-12 * (width + x.a.abs()))
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    s_lo = s_up = torch.where(ident, one, zero)
    shift_lo, shift_hi = torch.minimum(glo - lo, ghi - hi), torch.maximum(glo - lo, ghi - hi)
    c_lo = torch.where(ident, shift_lo - 1e-12 * (width + x.a.abs()), glo)
    c_up = torch.where(ident, shift_hi + 1e-12 * (width + x.a.abs()), ghi)
    if relu:   # the triangle relaxation on unstable neurons: the chord above, slope 0 or 1 below
        l, h = x.a + lo, x.a + hi
        unstable = (l < 0) & (h > 0)
        chord = torch.where(unstable, h / torch.where(unstable, h - l, one), zero)
        s_up = torch.where(unstable, chord, s_up)
        c_up = torch.where(unstable, chord * (-lo) - a, c_up)
        alpha = (h > -l).to(a.dtype)
        s_lo = torch.where(unstable, alpha, s_lo)
        c_lo = torch.where(unstable, alpha * x.a - a, c_lo)
    return v, Elementwise(s_lo, c_lo, s_up, c_up, slack)


def maxpool(fn: Callable, x: V, windows: Callable | None = None, refine: Callable | None = None):
    """Max pooling. With explicit ``windows`` (MaxPool1d/2d): :class:`WindowMaxBack`, the bounds of
    ``u_i = v_i - v_j*`` from the intervals, tightened by ``refine(index, j, candidates)`` where
    given (bounds of ``d_i - d_j*`` for every candidate ``i``, from backward passes); otherwise the argmax's
    error below and a constant above (:class:`MaxPoolBack`)."""
    a = fn(x.a)
    lo_in, hi_in = x.a + x.l(), x.a + x.h()
    v, slack = _finish(a, fn(lo_in) - a, fn(hi_in) - a)
    if windows is None:
        return v, Chain(Lin(None, [], slack=slack), MaxPoolBack(fn, x.a, torch.zeros_like(a, dtype=torch.bool),
                                                                fn(hi_in) - a))
    flat = torch.arange(x.a[0].numel(), dtype=x.a.dtype, device=x.a.device).reshape(1, *x.a.shape[1:])
    index = windows(flat)[0]                                                   # [C, *out, k], -inf: padding
    valid = torch.isfinite(index)
    index = torch.where(valid, index, torch.full_like(index, -1)).long()
    wa, wl, wh = windows(x.a), windows(x.l()), windows(x.h())
    wa = torch.where(valid, wa, torch.full_like(wa, -torch.inf))
    j = wa.argmax(-1, keepdim=True)
    aj, lj, hj = wa.gather(-1, j), wl.gather(-1, j), wh.gather(-1, j)
    l, h = (wa + wl) - (aj + hj), (wa + wh) - (aj + lj)                       # bounds of u_i = v_i - v_j*
    others = valid.unsqueeze(0) & torch.ones_like(wa, dtype=torch.bool).scatter(-1, j, False)
    if refine is not None and bool((others & (h > 0)).any()):
        jx = index.unsqueeze(0).expand(wa.shape).gather(-1, j).expand(wa.shape)
        dlo, dhi = refine(index.unsqueeze(0).expand(wa.shape), jx, others & (h > 0))
        l, h = torch.maximum(l, (wa - aj) + dlo), torch.minimum(h, (wa - aj) + dhi)
    cand = others & (h > 0)
    ident = cand & (l >= 0)
    tri = cand & (l < 0)
    c = torch.where(tri, h / torch.where(tri, h - l, torch.ones_like(h)), torch.zeros_like(h))
    c = torch.where(ident, torch.ones_like(c), c)
    b = torch.where(tri, -c * l, torch.zeros_like(c))
    du = torch.where(valid.unsqueeze(0), wa - aj, torch.zeros_like(wa))
    const = (c * du + b).sum(-1)
    coef_up = c.scatter(-1, j, 1 - c.sum(-1, keepdim=True))
    coef_lo = torch.zeros_like(c).scatter(-1, j, 1.0)
    back = WindowMaxBack(index, coef_up, coef_lo, const.reshape(a.shape), tuple(x.a.shape))
    return v, Chain(Lin(None, [], slack=slack), back)


def _pool_windows(m: nn.Module, dims: int) -> Callable | None:
    """``t -> [..., windows, k]`` for a MaxPool1d/2d without dilation or ceil mode, or None."""
    def tup(v):
        return (v,) * dims if isinstance(v, int) else tuple(v)
    k, p, d = tup(m.kernel_size), tup(m.padding), tup(m.dilation)
    s = tup(m.stride) if m.stride is not None else k
    if any(x != 1 for x in d) or m.ceil_mode:
        return None

    def windows(t: torch.Tensor) -> torch.Tensor:
        if any(p):
            t = F.pad(t, [q for pp in reversed(p) for q in (pp, pp)], value=-torch.inf)
        for i in range(dims):
            t = t.unfold(2 + i, k[i], s[i])
        return t.reshape(*t.shape[: 2 + dims], -1)
    return windows


def avgpool(fn: Callable, x: V, u: float):
    k = max(1, int(torch.Size(x.a.shape[2:]).numel()))
    a = fn(x.a)
    extra = 2 * (k + 1) * u * fn(x.a.abs() + x.err())
    v, slack = _finish(a, fn(x.l()) - extra, fn(x.h()) + extra)
    return v, Lin(fn, [_zero(x)], slack=slack + extra)


def batchnorm(m: nn.Module, x: V, u: float):
    if m.training or m.running_mean is None:
        raise Unsupported("BatchNorm in training mode or without running statistics; call model.eval()")
    mean, var = m.running_mean.double(), m.running_var.double()
    w = m.weight.double() if m.weight is not None else torch.ones_like(mean)
    b = m.bias.double() if m.bias is not None else torch.zeros_like(mean)
    view = [1, -1] + [1] * (x.a.dim() - 2)
    s = (w / torch.sqrt(var + m.eps)).reshape(view)
    sh, mu = b.reshape(view), mean.reshape(view)
    a = (x.a - mu) * s + sh
    extra = 8 * u * ((x.a.abs() + x.err() + mu.abs()) * s.abs() + sh.abs())
    p, q = x.l() * s, x.h() * s
    v, slack = _finish(a, torch.minimum(p, q) - extra, torch.maximum(p, q) + extra)
    return v, Lin(lambda d: d * s, [_zero(x)], slack=slack + extra)


_ADD = (operator.add, torch.add, operator.iadd)
_SUB = (operator.sub, torch.sub, operator.isub)
_MUL = (operator.mul, torch.mul, operator.imul)
_DIV = (operator.truediv, torch.div, operator.itruediv)


def _scaled(x: V, c: Any, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p, q = x.l() * c + torch.zeros_like(a), x.h() * c + torch.zeros_like(a)
    return torch.minimum(p, q), torch.maximum(p, q)


def arith(op: Callable, x: V, y: V, u: float, x_in: bool, y_in: bool):
    """``op(x, y)``; ``x_in``/``y_in``: whether that operand is a graph tensor (has an error to pass back)."""
    if op in _ADD or op in _SUB:
        a = op(x.a, y.a)
        sign = -1.0 if op in _SUB else 1.0
        ylo, yhi = (y.l(), y.h()) if sign > 0 else (-y.h(), -y.l())
        v, slack = _finish(a, x.l() + ylo + torch.zeros_like(a), x.h() + yhi + torch.zeros_like(a), u)
        if x_in and y_in:
            return v, Lin(lambda dx, dy: dx + sign * dy, [_zero(x), _zero(y)], slack=slack)
        if x_in:
            fn = None if x.a.shape == a.shape else (lambda dx: dx + torch.zeros_like(a))
            return v, Lin(fn, [_zero(x)], slack=slack)
        return v, Lin(lambda dy: sign * dy + torch.zeros_like(a), [_zero(y)], slack=slack)
    if op in _MUL:
        a = x.a * y.a
        if x_in and y_in and not x.exact and not y.exact:
            ex, ey = x.err(), y.err()
            e = x.a.abs() * ey + y.a.abs() * ex + ex * ey
            v, _ = _finish(a, -e, e, u)
            return v, Cut(v.lo, v.hi)
        if x_in:
            v, slack = _finish(a, *_scaled(x, y.a, a), u)
            return v, Lin(lambda dx: dx * y.a + torch.zeros_like(a), [_zero(x)], slack=slack)
        v, slack = _finish(a, *_scaled(y, x.a, a), u)
        return v, Lin(lambda dy: dy * x.a + torch.zeros_like(a), [_zero(y)], slack=slack)
    if op in _DIV:
        if not y.exact and bool((y.err() > 0).any()):
            raise Unsupported("division by a tensor that carries quantization error")
        a = x.a / y.a
        v, slack = _finish(a, *_scaled(x, 1.0 / y.a if isinstance(y.a, torch.Tensor) else 1.0 / y.a, a), u)
        return v, Lin(lambda dx: dx / y.a + torch.zeros_like(a), [_zero(x)], slack=slack)
    raise Unsupported(f"arithmetic {op}")


# -- quantized and float layers ------------------------------------------------------------------
def _round32(v: torch.Tensor, down: bool) -> torch.Tensor:
    """``v`` (float64) rounded to float32 towards -inf (``down``) or +inf."""
    f = v.float()
    if down:
        return torch.where(f.double() > v, torch.nextafter(f, torch.full_like(f, -torch.inf)), f)
    return torch.where(f.double() < v, torch.nextafter(f, torch.full_like(f, torch.inf)), f)


ROUNDING = ("worst", "exact")


def act_quant(aq: ActQuantizer | None, x: V, u: float, rounding: str = "worst"):
    """``Q(a^) - a`` for the layer's input quantizer (see :func:`_quant_worst` / :func:`_quant_exact`)."""
    if aq is None or not aq.enabled or not x.a.is_floating_point() or aq.scale is None:
        return x, None   # no quantizer, or uncalibrated: float pass-through
    if aq.observing:
        raise Unsupported("activation quantizer is still observing (inside lb.calibrate)")
    if aq.spec.dynamic:
        raise Unsupported(f"dynamic activation quantization ({aq.spec}) has an input-dependent grid")
    if not aq.spec.number_format.integer_grid:
        raise Unsupported(f"activation format {aq.spec.format!r}: the bound models uniform integer grids only")
    spec = aq.spec.replace(rounding="nearest")
    s = broadcast_param(aq.scale.double(), x.a.shape, spec)
    z = broadcast_param(aq.zero_point.double(), x.a.shape, spec)
    bot, top = (spec.qmin - z) * s, (spec.qmax - z) * s
    if rounding == "worst":
        return _quant_worst(x, s, bot, top, u)
    return _quant_exact(aq, spec, x, s, bot, top, u)


def _quant_worst(x: V, s, bot, top, u: float):
    """Rounding as an adversary: ``Q(v)`` anywhere in ``[v - s/2, v + s/2]`` inside the grid's range
    ``[bot, top]`` (any round-to-nearest implementation), clipping exactly: ``Q(v) in
    [clamp(v - s/2), clamp(v + s/2)]``, monotone in ``v``."""
    vlo, vhi = x.a + x.l(), x.a + x.h()
    slack = 4 * u * (vlo.abs() + vhi.abs() + top.abs() + bot.abs() + s) + 8 * U64 * x.a.abs()
    qlo = torch.minimum(torch.maximum(vlo - s / 2, bot), top) - slack
    qhi = torch.minimum(torch.maximum(vhi + s / 2, bot), top) + slack
    out = V(x.a, qlo - x.a, qhi - x.a)
    # backward: d_q = d + rho, |rho| <= s/2 where the interval lies inside the grid's range widened by
    # half a step (for v in [bot - s/2, bot], Q(v) = bot is within s/2 of v). Where it crosses only
    # the top end: Q(v) <= v + s/2 above, and below the chord of the concave min(v - s/2, top);
    # only the bottom end: Q(v) >= v - s/2, and above the chord of the convex max(v + s/2, bot);
    # both ends: the constant range.
    inside = (vlo >= bot - s / 2 + slack) & (vhi <= top + s / 2 - slack)
    top_cut = ~inside & (vlo >= bot - s / 2 + slack) & (vlo < top + s / 2)
    bot_cut = ~inside & (vhi <= top + s / 2 - slack) & (vhi > bot - s / 2)
    width = (vhi - vlo).clamp_min(1e-300)
    low_env = lambda v: torch.minimum(v - s / 2, top)     # noqa: E731
    up_env = lambda v: torch.maximum(v + s / 2, bot)      # noqa: E731
    c_top = ((low_env(vhi) - low_env(vlo)) / width).clamp(0, 1)
    c_bot = ((up_env(vhi) - up_env(vlo)) / width).clamp(0, 1)
    one, zero = torch.ones_like(x.a), torch.zeros_like(x.a)
    half = s / 2 + slack
    s_lo = torch.where(inside | bot_cut, one, torch.where(top_cut, c_top, zero))
    s_up = torch.where(inside | top_cut, one, torch.where(bot_cut, c_bot, zero))
    c_lo = torch.where(inside | bot_cut, -half + zero, torch.where(
        top_cut, low_env(vlo) + c_top * (x.a - vlo) - x.a - slack, out.lo))
    c_up = torch.where(inside | top_cut, half + zero, torch.where(
        bot_cut, up_env(vlo) + c_bot * (x.a - vlo) - x.a + slack, out.hi))
    return out, Elementwise(s_lo, c_lo, s_up, c_up)


def _quant_exact(aq: ActQuantizer, spec, x: V, s, bot, top, u: float):
    """The quantizer as ``q`` computes it: monotone, so ``Q(a^) in [Q(a + lo), Q(a + hi)]`` (ends
    rounded outwards to float32), rounding and clipping exactly."""
    lo, hi = _round32(x.a + x.l(), down=True), _round32(x.a + x.h(), down=False)
    qlo = ops.fake_quantize(lo, spec, aq.scale, aq.zero_point).double()
    qhi = ops.fake_quantize(hi, spec, aq.scale, aq.zero_point).double()
    lo, hi = lo.double(), hi.double()
    tiny = 8 * U64 * (x.a.abs() + hi.abs() + lo.abs() + qlo.abs() + qhi.abs())
    out = V(x.a, qlo - x.a - tiny, qhi - x.a + tiny)
    # backward, per element: "constant" d_q in [Q(lo) - a, Q(hi) - a] (slope 0), or "identity"
    # d_q = d + rho with rho = Q(a^) - a^ in [Q(lo) - hi, Q(hi) - lo] (and |rho| <= s/2 inside the
    # grid): whichever leaves the narrower bounded term.
    rho_lo, rho_hi = qlo - hi - tiny, qhi - lo + tiny
    inside = (lo >= bot) & (hi <= top)
    saw = s / 2 + 4 * u * (hi.abs() + lo.abs() + s)
    rho_lo = torch.where(inside, torch.maximum(rho_lo, -saw), rho_lo)
    rho_hi = torch.where(inside, torch.minimum(rho_hi, saw), rho_hi)
    ident = (rho_hi - rho_lo) < (out.hi - out.lo)
    slope = ident.to(x.a.dtype)
    back = Elementwise(slope, torch.where(ident, rho_lo, out.lo), slope, torch.where(ident, rho_hi, out.hi))
    return out, back


def layer_rule(op: Callable, w_float: torch.Tensor, w_quant: torch.Tensor, bias: torch.Tensor | None,
               x: V, aq: ActQuantizer | None, u: float, ue: float, rounding: str = "worst"):
    """``op(Q(x), W_q, b)`` against ``op(x, W, b)`` (``op`` a linear or convolution)."""
    xq, qback = act_quant(aq, x, ue, rounding)
    wf, wq = w_float.double(), w_quant.double()
    b = None if bias is None else bias.detach().double()
    awq, dw = wq.abs(), wq - wf
    n = int(wq[0].numel())
    g32, g64 = _gamma(n, u), _gamma(n, U64)
    a = op(x.a, wf, b)
    lq, hq = xq.l(), xq.h()
    mid, rad = op((lq + hq) / 2, wq, None), op((hq - lq) / 2, awq, None)
    mag = op(x.a.abs(), awq, None)                                  # |W_q| |a|
    t1 = op(xq.err(), awq, None)                                    # |W_q| E_q
    if bool((dw != 0).any()):      # the weight error acts on the known float input: dW a, exactly
        t2, dwa = op(x.a.abs(), dw.abs(), None), op(x.a, dw, None)
    else:
        t2, dwa = torch.zeros_like(a), torch.zeros_like(a)
    slack = g32 * (mag + t1) + g64 * (mag + 2 * t2)
    if b is not None:
        ab = b.abs().reshape([1, -1] + [1] * (a.dim() - 2)) if w_float.dim() > 2 else b.abs()
        slack = slack + (g32 + g64) * ab
    v, fin = _finish(a, mid + dwa - rad - slack, mid + dwa + rad + slack)
    lin = Lin(lambda d: op(d, wq, None), [torch.zeros_like(x.a)], const=dwa, slack=slack + fin)
    return v, (Chain(lin, qback) if qback is not None else lin)
