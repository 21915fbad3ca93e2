"""``lb.qat.prepare``: turn a quantized model into one that trains through its grids.

::

    q = lb.quantize(model, weights=lb.QuantSpec(bits=2, granularity=lb.PerChannel(0)),
                    activations=lb.QuantSpec(bits=8, symmetric=False))
    with lb.calibrate(q):                       # PTQ first: the learned ranges start from it
        for x in calibration_batches: q(x)
    lb.qat.prepare(q, learn_scales=True, rounding="stochastic", seed=0)
    opt = torch.optim.AdamW(q.parameters(), lr=1e-3)   # after prepare: the scales are parameters
    for x, y in loader:                         # any ordinary PyTorch loop
        loss = F.cross_entropy(q(x), y); opt.zero_grad(); loss.backward(); opt.step()
    lb.freeze(q)                                # the same integer model PTQ makes, with the learned grids

A model straight from ``lb.quantize`` already trains this way (identity straight-through
estimator, fixed activation ranges, weight grids refitted each step); ``prepare`` adds the options
of :class:`QATConfig`. It acts in place, like ``lb.freeze``, and returns the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import ops
from ..modules import QuantLayer
from .functional import SURROGATES
from .quantizers import ACT_LEARNING, ROUNDINGS, SCALE_INITS, QATActQuantizer, QATWeightQuantizer

__all__ = ["QATConfig", "prepare", "to_fixed", "config_of", "qparams", "rng_state", "set_rng_state"]


@dataclass(frozen=True)
class QATConfig:
    """How a quantized model trains (``lb.qat.prepare(q, **fields)``).

    Attributes:
        learn_scales: learn the weight step sizes (LSQ) and the calibrated activation ranges
            (as ``act_learning`` says); False keeps PTQ's grids (weights refitted every step).
        act_learning: ``"lsq"`` (step size, Esser et al. 2020) or ``"pact"`` (clipping level
            learned from the clipped values only, Choi et al. 2018) for activation ranges.
        scale_init: initial weight step: ``"observer"`` (the PTQ grid) or ``"lsq"``
            (``2 mean|w| / sqrt(Q_P)``).
        ste: ``"identity"`` or ``"clipped"`` (zero gradient where a value saturated).
        rounding: weight rounding in training, ``"nearest"`` or ``"stochastic"``
            (evaluation always rounds to nearest).
        surrogate: ``"ste"`` (round, straight-through) or ``"noise"`` (weights get ``U(-s/2, s/2)``
            noise instead of rounding in training; Défossez et al. 2022, Baskin et al. 2021).
        seed: seeds the random generator of each quantizer (``seed`` plus its index).
    """

    learn_scales: bool = True
    act_learning: str = "lsq"
    scale_init: str = "observer"
    ste: str = "identity"
    rounding: str = "nearest"
    surrogate: str = "ste"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.learn_scales, bool):
            raise TypeError(f"learn_scales must be a bool, got {self.learn_scales!r}")
        for name, allowed in (("act_learning", ACT_LEARNING[:-1]), ("scale_init", SCALE_INITS),
                              ("ste", ops.STE_MODES), ("rounding", ROUNDINGS), ("surrogate", SURROGATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def as_dict(self) -> dict:
        return asdict(self)


def _layers(q: nn.Module) -> list[tuple[str, QuantLayer]]:
    layers = [(n, m) for n, m in q.named_modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise ValueError("q has no quantized layer; call lb.quantize(model, ...) first")
    return layers


def prepare(q: nn.Module, config: QATConfig | None = None, **options) -> nn.Module:
    """Set ``q`` (from ``lb.quantize``, activations calibrated) up for QAT, in place; returns ``q``.

    Pass a :class:`QATConfig` or its fields as keywords. Replaces every layer's weight and
    activation quantizer by :class:`QATWeightQuantizer` / :class:`QATActQuantizer`; learned
    steps become ``nn.Parameter`` s, so build the optimizer afterwards. Calling ``prepare`` again
    re-applies the new options, keeping the grids learned so far. The options are recorded in
    ``q.lowbit_qat``.
    """
    if config is None:
        config = QATConfig(**options)
    elif options:
        raise TypeError("pass either a QATConfig or keyword options, not both")
    if not isinstance(config, QATConfig):
        raise TypeError(f"config must be a lowbit.qat.QATConfig, got {type(config).__name__}")
    layers = _layers(q)
    frozen = [n for n, layer in layers if layer.frozen]
    if frozen:
        raise ValueError(f"layer {frozen[0]!r} is frozen (integer weights): QAT needs the float master "
                         "weights; prepare the model before lb.freeze")
    if config.learn_scales:
        missing = [n for n, layer in layers if layer.input_quant is not None and layer.input_quant.enabled
                   and not layer.input_quant.calibrated]
        if missing and len(missing) == sum(layer.input_quant is not None for _, layer in layers):
            raise ValueError("learn_scales=True starts the activation ranges from calibration: run "
                             "`with lb.calibrate(q): q(x)` on some batches before lb.qat.prepare "
                             f"(uncalibrated: {missing[:3]})")
    to_fixed(q)
    for i, (_, layer) in enumerate(layers):
        seed = config.seed * 1_000_003 + 2 * i
        device = layer.weight.device
        wq = QATWeightQuantizer(layer.weight_quant, layer.weight, learn_scale=config.learn_scales,
                                scale_init=config.scale_init, rounding=config.rounding, surrogate=config.surrogate,
                                ste=config.ste, seed=seed)
        layer.weight_quant = wq.to(device).train(layer.training)
        if layer.input_quant is not None:
            aq = QATActQuantizer(layer.input_quant, learn=config.act_learning if config.learn_scales else None,
                                 ste=config.ste, seed=seed + 1)
            layer.input_quant = aq.to(device).train(layer.training)
    q.lowbit_qat = config
    return q


def to_fixed(q: nn.Module) -> nn.Module:
    """Replace QAT quantizers by plain ones holding the learned grids (in place; ``lb.freeze`` does
    this first). Eval-mode outputs do not change. Returns ``q``."""
    for _, layer in _layers(q):
        for attr in ("weight_quant", "input_quant"):
            qz = getattr(layer, attr)
            if isinstance(qz, (QATWeightQuantizer, QATActQuantizer)):
                setattr(layer, attr, qz.to_fixed())
    if hasattr(q, "lowbit_qat"):
        del q.lowbit_qat
    return q


def config_of(q: nn.Module) -> QATConfig | None:
    """The :class:`QATConfig` ``q`` was prepared with, or None."""
    return getattr(q, "lowbit_qat", None)


def qparams(q: nn.Module) -> dict[str, torch.Tensor]:
    """Every grid of ``q`` as the forward uses it: ``{"<layer>.weight.scale": ..., "<layer>.input.zero_point": ...}``.

    Weight grids not yet fitted are fitted from the current weight. For comparing replicas and runs.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in _layers(q):
        if layer.frozen:
            out[f"{name}.weight.scale"], out[f"{name}.weight.zero_point"] = layer.weight_scale, layer.weight_zero_point
        else:
            out[f"{name}.weight.scale"], out[f"{name}.weight.zero_point"] = layer.weight_quant.qparams(layer.weight)
        aq = layer.input_quant
        if aq is not None and aq.scale is not None:
            s = aq.scale.detach()
            out[f"{name}.input.scale"] = s.clamp_min(torch.finfo(s.dtype).tiny)
            out[f"{name}.input.zero_point"] = aq.zero_point
    return {k: v.detach() for k, v in out.items()}


def _generators(q: nn.Module):
    for name, m in q.named_modules():
        if isinstance(m, (QATWeightQuantizer, QATActQuantizer)):
            yield name, m


def rng_state(q: nn.Module) -> dict[str, torch.Tensor]:
    """The random-generator state of every QAT quantizer that has drawn numbers (for checkpoints)."""
    return {name: m.generator.get_state() for name, m in _generators(q) if m.generator is not None}


def set_rng_state(q: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Restore generator states saved by :func:`rng_state` (quantizers absent from it are reseeded)."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be the dict lb.qat.rng_state returned, got {type(state).__name__}")
    names = dict(_generators(q))
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"state has generators for quantizers q does not have: {unknown[:3]}")
    for name, m in names.items():
        m.generator = None
        if name in state:
            device = m.scale.device if m.scale is not None else torch.device("cpu")
            m.generator = m._generator(device)
            m.generator.set_state(state[name])
