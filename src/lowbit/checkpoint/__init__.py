"""Quantized checkpoints: ``lb.save(q, path)`` and ``lb.load(path, model_like)``.

The file is plain `safetensors <https://github.com/huggingface/safetensors>`_: every tensor of the
quantized model's ``state_dict`` as it is stored (integer weight codes, packed two or four per byte
for 4- and 2-bit grids; weight scales and zero points; activation scales and zero points; biases
and every float tensor of the layers that stayed float), plus a *quantization map* as JSON in the
header metadata (key ``"lowbit"``). :func:`read_quant_map` returns it in this full layout::

    {"format": "lowbit", "format_version": 2, "lowbit_version": ..., "model_class": ..., "training": ...,
     "fold_bn": ..., "folded": [[layer, batchnorm], ...],
     "specs": [{"bits", "signed", "symmetric", "granularity": {"type", ...}, "rounding", "narrow_range",
                "dynamic"}, ...],                                   # each distinct QuantSpec once
     "info": {"weights": spec index, "activations": spec index | null, "observer", "skipped", "uncalibrated"},
     "layers": {name: {"class", "float_class", "weight_shape", "frozen", "bias",
                       "weight": {"spec": index, "observer", "options", "ste", "enabled", "fixed"},
                       "activation": null | {"spec": index, "observer", "options", "ste", "enabled", "qparams"}}},
     "implied": {tensor: {"value", "shape", "dtype"}}, "casts": {tensor: dtype}, "aliases": {tensor: tensor}}

The file holds the compact form of format version 2 (defaults left out, shared layer fields once,
implied zero points as a list; :mod:`lowbit.checkpoint.compact`), which keeps the fixed cost of a
small model's file low; version 1 files (the full layout) are still read.

Zero points of symmetric grids (all equal to ``spec.symmetric_zero_point``) are not written
(``implied``); other zero points are written in the grid's own integer type (``casts`` restores
int32). Tensors that share memory (tied weights) are written once (``aliases``).

``lb.load`` rebuilds the quantized structure on a float model of the same architecture (BatchNorm
folded as recorded, each layer's weight and activation quantizers from the map), loads the tensors
and returns a model whose outputs are bit-identical to the saved one's.

**Un-frozen models** (fake quantization, e.g. QAT in progress) are saved as they are: float master
weights plus the quantizer state (activation qparams, pinned weight grids), flagged
``"frozen": false``; ``lb.load`` returns an un-frozen model that computes the same outputs and can
be trained further. Such a file is as large as the float model (a warning says so); call
``lb.freeze(q)`` first for a compact integer checkpoint.

Writing is atomic: the bytes go to a temporary file in the target's directory, are fsync'ed and
moved over the target with ``os.replace``, so a failed or interrupted save leaves the old file.
"""
from .atomic import atomic_write
from .fileformat import FORMAT_VERSION, read_quant_map, spec_from_dict, spec_to_dict
from .reader import load
from .writer import save

__all__ = ["save", "load", "read_quant_map", "atomic_write", "FORMAT_VERSION", "spec_to_dict", "spec_from_dict"]
