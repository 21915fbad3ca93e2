"""Larger than memory: a Hugging Face checkpoint quantized block by block, resumable.

``lb.quantize_checkpoint(src, dst, recipe, calibration)`` never holds the float model: the
skeleton is built on the ``meta`` device (:mod:`.skeleton`), each unit's tensors are read from the
shards when it is its turn (:mod:`.shards`), the recipe's steps run on it with the cached
activations of the previous unit (:mod:`.stages`, :mod:`.acts`), and its frozen tensors go to an
atomic output shard (:mod:`.output`). :mod:`.runner` is the loop. docs/streaming.md has the guide.
"""
from .runner import quantize_checkpoint

__all__ = ["quantize_checkpoint"]
