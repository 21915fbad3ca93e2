"""Which propagation rule of :mod:`.bound_rules` a graph node gets (by module type, function or method).

A node with no rule raises :class:`~.bound_rules.Unsupported`, which the caller reports by name.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import ActQuantizer, QuantLayer, quant_class_for
from .bound_back import Lin
from .bound_rules import (Unsupported, V, _pool_windows, _zero, act_quant, avgpool, batchnorm, identity,
                          layer_rule, maxpool, monotone, structural, unit_roundoff)

__all__ = ["module_rule", "function_rule", "method_rule"]

# -- dispatch ------------------------------------------------------------------------------------
_MONOTONE_MODULES = (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.Sigmoid, nn.Tanh)  # ReLU6 is a Hardtanh
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


def module_rule(m: nn.Module, pairs: dict, name: str, dtype: torch.dtype, device: torch.device,
                rounding: str = "worst") -> Callable:
    """The rule for ``call_module`` of ``m`` (``V -> (V, Back)``), or raise :class:`Unsupported`."""
    u = unit_roundoff(dtype, device)
    if isinstance(m, QuantLayer):
        wf, wq = pairs[name]
        ul = unit_roundoff(dtype, device, "linear" if wq.dim() == 2 else "conv")
        return lambda x: layer_rule(m.op, wf, wq, m.bias, x, m.input_quant, ul, u, rounding)
    if isinstance(m, ActQuantizer):
        def quant(x):
            v, back = act_quant(m, x, u, rounding)
            return (v, back) if back is not None else identity(x)
        return quant
    cls, _ = quant_class_for(m)   # a registered layer type (or a subclass computing its function)
    if cls is not None:
        kind = "linear" if cls.channel_dim == -1 else "conv"
        ul = unit_roundoff(dtype, device, kind)
        if getattr(m, "padding_mode", "zeros") != "zeros":
            raise Unsupported(f"{type(m).__name__} with padding_mode={m.padding_mode!r}")
        w = cls.float_gemm_weight(m).detach()                          # Conv1D: its [out, in] view
        op = cls.float_op(m)                                           # the layer's function of that view
        return lambda x: layer_rule(op, w, w, m.bias, x, None, ul, u)
    if isinstance(m, _IDENTITY_MODULES):
        if isinstance(m, nn.Identity) or not m.training or m.p == 0:
            return identity
        raise Unsupported(f"{type(m).__name__} in training mode; call model.eval()")
    if isinstance(m, _MONOTONE_MODULES):
        if isinstance(m, nn.LeakyReLU) and m.negative_slope < 0:
            raise Unsupported("LeakyReLU with a negative slope is not monotone")
        exact = isinstance(m, (nn.ReLU, nn.Hardtanh))
        return lambda x: monotone(lambda t: m(t), x, u, exact, relu=type(m) is nn.ReLU)
    if isinstance(m, _MAXPOOL):
        if getattr(m, "return_indices", False):
            raise Unsupported(f"{type(m).__name__} with return_indices=True")
        windows = _pool_windows(m, 1 if isinstance(m, nn.MaxPool1d) else 2) \
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) else None
        return lambda x: maxpool(lambda t: m(t), x, windows)
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


def function_rule(fn: Any, args: tuple, kwargs: dict, u: float):
    """Rule for ``call_function``: ``(x, rest, kw) -> (V, Back)``, or a tag ("arith", "cat", "value")."""
    if fn in _ARITH:
        if "alpha" in kwargs:
            raise Unsupported(f"{getattr(fn, '__name__', fn)} with alpha")
        return "arith"
    if fn is operator.neg:
        return lambda x, rest, kw: (V(-x.a, -x.h(), -x.l()), Lin(lambda d: -d, [_zero(x)]))
    if fn in _STRUCT_FUNCS:
        return lambda x, rest, kw: structural(lambda t: fn(t, *rest, **kw), x)
    if fn is torch.cat:
        return "cat"
    if fn in _MONO_FUNCS:
        if fn is F.leaky_relu and (args[1:] or [kwargs.get("negative_slope", 0.01)])[0] < 0:
            raise Unsupported("leaky_relu with a negative slope is not monotone")
        relu = fn in (F.relu, torch.relu)
        return lambda x, rest, kw: monotone(lambda t: fn(t, *rest, **kw), x, u, _MONO_FUNCS[fn], relu)
    if fn in _MAXPOOL_F:
        if kwargs.get("return_indices"):
            raise Unsupported("max pooling with return_indices=True")
        return lambda x, rest, kw: maxpool(lambda t: fn(t, *rest, **kw), x)
    if fn in _AVGPOOL_F:
        return lambda x, rest, kw: avgpool(lambda t: fn(t, *rest, **kw), x, u)
    if fn is F.dropout:
        if kwargs.get("training", args[2] if len(args) > 2 else True):
            raise Unsupported("F.dropout with training=True")
        return lambda x, rest, kw: identity(x)
    if fn in (getattr, operator.getitem):
        return "value"
    raise Unsupported(f"function {getattr(fn, '__qualname__', fn)} has no bound propagation rule")


def method_rule(name: str, u: float):
    """Rule for ``call_method``."""
    if name in _STRUCT_METHODS:
        return lambda x, rest, kw: structural(lambda t: getattr(t, name)(*rest, **kw), x)
    if name in _VALUE_METHODS:
        return "value"
    if name in _MONO_METHODS:
        return lambda x, rest, kw: monotone(lambda t: getattr(t, name)(*rest, **kw), x, u, _MONO_METHODS[name],
                                            name == "relu")
    if name in ("add", "sub", "mul", "div"):
        return "arith"
    raise Unsupported(f"method .{name}() has no bound propagation rule")
