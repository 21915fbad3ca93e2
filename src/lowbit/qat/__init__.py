"""Quantization-aware training (``lb.qat``): training through the rounding.

Rounding has zero gradient almost everywhere, so training a quantized model needs a surrogate:

* the **straight-through estimator** (Bengio et al. 2013) treats rounding as the identity in the
  backward pass (``ste="identity"``), or as the identity inside the grid and 0 where the value
  saturated (``"clipped"``);
* **stochastic rounding** (Gupta et al. 2015) rounds up with probability equal to the fraction,
  so ``E[q] = w``: small updates survive in expectation;
* **additive noise** (Défossez et al. 2022, DiffQ; Baskin et al. 2021, NICE) replaces rounding by
  ``U(-s/2, s/2)`` noise in training, the model of the rounding error that the STE's gradient is
  exact for;
* **learned step sizes** (LSQ, Esser et al. 2020) and **learned clipping** (PACT, Choi et al. 2018)
  make the grid itself a parameter.

A model from ``lb.quantize`` trains with any PyTorch loop as it is (identity STE). :func:`prepare`
adds the options above; :func:`lowbit.freeze` then makes the same integer model PTQ makes, with the
learned grids. :mod:`lowbit.qat.distributed` keeps grids identical across DDP ranks.
"""
from . import distributed, functional
from .distributed import qparams_digest, replicas_agree, sync_calibration
from .functional import grad_scale, lsq_grad_factor, noise_fake_quantize, pact_fake_quantize
from .prepare import QATConfig, config_of, prepare, qparams, rng_state, set_rng_state, to_fixed
from .quantizers import QATActQuantizer, QATWeightQuantizer

__all__ = [
    "QATConfig", "prepare", "to_fixed", "config_of", "qparams", "rng_state", "set_rng_state",
    "QATWeightQuantizer", "QATActQuantizer",
    "sync_calibration", "replicas_agree", "qparams_digest",
    "grad_scale", "lsq_grad_factor", "noise_fake_quantize", "pact_fake_quantize",
    "functional", "distributed",
]
