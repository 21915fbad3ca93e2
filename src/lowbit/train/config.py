"""``RunConfig``: everything that decides the result of a ``lowbit train`` run (its *recipe*).

Two runs with equal recipes, the same float model and the same number of processes compute the
same bits; that is what lets ``--resume`` continue a checkpoint, and why a checkpoint written
under a different recipe is refused with the fields that differ (:func:`recipe_differences`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..qat import QATConfig
from ..spec import PerChannel, QuantSpec

__all__ = ["RunConfig", "recipe_differences", "model_fingerprint"]


@dataclass(frozen=True)
class RunConfig:
    """A QAT fine-tuning run of a built-in model (``lowbit train``).

    The float model is the trained zoo model; PTQ (``lb.quantize`` with ``observer`` ranges, then
    calibration on ``calibration_batches`` batches of the train split) initialises the grids,
    then QAT trains all weights and grids for ``epochs`` epochs with AdamW and a one-cycle
    schedule peaking at ``lr`` (the zoo's deterministic loop).

    Attributes:
        model: a built-in CNN (``"mnist1d"`` or ``"digits"``).
        weights: weight bits (per output channel, symmetric).
        activations: activation bits (per tensor, asymmetric), or None for float activations.
        observer: range method of the PTQ initialisation.
        rounding, surrogate, learn_scales, act_learning, scale_init, ste: see :class:`lowbit.qat.QATConfig`.
        threads: torch threads per process during training (not part of the recipe).
    """

    model: str = "mnist1d"
    weights: int = 4
    activations: int | None = 8
    observer: str = "mse"
    calibration_batches: int = 8
    rounding: str = "nearest"
    surrogate: str = "ste"
    learn_scales: bool = True
    act_learning: str = "lsq"
    scale_init: str = "observer"
    ste: str = "identity"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.model, str):
            raise TypeError(f"model must be a built-in model name (str), got {type(self.model).__name__}")
        for name in ("weights", "epochs", "batch_size", "calibration_batches", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not 2 <= self.weights <= 16:
            raise ValueError(f"weights must be a bit width in 2..16, got {self.weights}")
        if self.activations is not None and (isinstance(self.activations, bool) or not isinstance(self.activations, int)
                                             or not 2 <= self.activations <= 16):
            raise ValueError(f"activations must be a bit width in 2..16 or None (float), got {self.activations!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        self.qat_config()  # validates rounding, surrogate, ste, ... with their messages

    def weight_spec(self) -> QuantSpec:
        return QuantSpec(bits=self.weights, granularity=PerChannel(0))

    def activation_spec(self) -> QuantSpec | None:
        return None if self.activations is None else QuantSpec(bits=self.activations, symmetric=False)

    def qat_config(self) -> QATConfig:
        return QATConfig(learn_scales=self.learn_scales, act_learning=self.act_learning, scale_init=self.scale_init,
                         ste=self.ste, rounding=self.rounding, surrogate=self.surrogate, seed=self.seed)

    def recipe(self) -> dict:
        """The fields that decide the result (all but ``threads``)."""
        return {k: v for k, v in asdict(self).items() if k != "threads"}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def recipe_differences(saved: dict, now: dict) -> list[str]:
    """``["weights: checkpoint 2, this run 3", ...]`` for every key whose values differ."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return out


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's state dict: names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
