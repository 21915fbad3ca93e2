"""GPTQ: data-aware 4-bit (and wider) weight quantization by error-compensating rounding.

Frantar, Ashkboos, Hoefler & Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers". ``lb.gptq(q, batches)`` runs it on a model from
``lb.quantize`` (see :mod:`lowbit.gptq.driver`); :func:`lowbit.gptq.solver.solve` is the
per-matrix algorithm.
"""
from .driver import gptq
from .report import GPTQReport, LayerReport
from .solver import solve

__all__ = ["gptq", "solve", "GPTQReport", "LayerReport"]
