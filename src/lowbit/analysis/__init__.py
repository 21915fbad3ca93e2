"""Analysis of a quantized model: where the error comes from, how much it matters, bounds and bits.

* :mod:`.anatomy`: per-layer error anatomy (clip vs round, saturation, SQNR, the clip sweep);
* :mod:`.divergence`: exact KL of the outputs and its second-order prediction ``Var_p[dz] / 2``;
* :mod:`.sensitivity` and :mod:`.mixed`: one-layer-at-a-time sensitivity, bits per layer under a budget;
* :mod:`.bound`: certified per-input bounds on the logit change;
* :mod:`.certify`: certified predictions from bounds on the logit differences, beside the
  first-order worst-case limit (:mod:`.limit`) and the adversarial-rounding search (:mod:`.attack`);
* :mod:`.mdl`: description length of the model and the data, in bits;
* :mod:`.report`: ``lb.analyze`` and the :class:`Report` (JSON and a self-contained HTML page).
"""
from .anatomy import LayerAnatomy, TensorAnatomy, clip_sweep, error_anatomy, tensor_anatomy
from .bound import BoundResult, logit_bound
from .attack import RoundingAttack, rounding_attack
from .certify import Certificate, certify
from .limit import FirstOrderLimit, first_order_limit
from .divergence import KLSummary, cosine_distance, divergence, kl, kl_predicted, kl_summary, output_mse
from .mdl import DescriptionLength, LayerCode, description_length, empirical_entropy, prior_code_length
from .mixed import BitAllocation, allocate_bits, apply_bits
from .probe import Probe, weight_pairs
from .report import Report, analyze
from .sensitivity import Sensitivity, bit_sensitivity, layer_sensitivity

__all__ = [
    "kl", "kl_predicted", "kl_summary", "KLSummary", "output_mse", "cosine_distance", "divergence",
    "error_anatomy", "tensor_anatomy", "clip_sweep", "LayerAnatomy", "TensorAnatomy",
    "layer_sensitivity", "bit_sensitivity", "Sensitivity", "allocate_bits", "apply_bits", "BitAllocation",
    "logit_bound", "BoundResult", "certify", "Certificate", "first_order_limit", "FirstOrderLimit",
    "rounding_attack", "RoundingAttack", "Probe", "weight_pairs",
    "description_length", "DescriptionLength", "LayerCode", "prior_code_length", "empirical_entropy",
    "analyze", "Report",
]
