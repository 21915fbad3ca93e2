"""A user's model on the command line, as ``lowbit quantize`` takes it: ``--model package.module:factory``
(called with no arguments) ``--state-dict FILE`` (``torch.save(model.state_dict())`` or .safetensors),
or ``--model DIR``, a Hugging Face model directory (config.json + safetensors, as ``save_pretrained``
writes it; no ``--state-dict``); then ``--calibration FILE.pt`` (a tensor of inputs, e.g. token ids
``(N, T)``, split into ``--batch-size`` rows, or a list of batches) and optionally ``--test FILE.pt``
(inputs, or ``(inputs, labels)``)."""
from __future__ import annotations

import argparse
import os

from ._args import import_factory, is_factory, positive_int

__all__ = ["add_arguments", "load", "check_unused", "is_directory", "is_user_model"]


def is_directory(text: str) -> bool:
    """``--model`` names a directory (a Hugging Face model directory): an existing one, or a path."""
    return not is_factory(text) and (os.path.isdir(text) or os.sep in text or text.startswith("."))


def is_user_model(text: str) -> bool:
    """``package.module:factory`` or a model directory (anything else names a built-in model)."""
    return is_factory(text) or is_directory(text)

_FLAGS = ("state_dict", "calibration", "test")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("user model (--model package.module:factory)")
    g.add_argument("--state-dict", metavar="PATH", help="weights of a user model")
    g.add_argument("--calibration", metavar="PATH", help="calibration inputs of a user model (.pt)")
    g.add_argument("--test", metavar="PATH", help="test inputs (and labels) of a user model (.pt)")
    g.add_argument("--batch-size", type=positive_int, default=64, metavar="N", help="rows per batch (64)")


def check_unused(args: argparse.Namespace, model: str) -> None:
    """Built-in models bring their own weights and data: the user-model files must not be given."""
    for flag in _FLAGS:
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')} is for user models (--model package.module:factory); "
                             f"built-in model {model!r} brings its own weights and data")


def load(args: argparse.Namespace, need_calibration: bool = True):
    """``(float_model, calibration_batches, test)`` of the user model named by ``args``; ``test`` is
    ``(inputs, labels or None)`` or None."""
    from .. import demo

    if is_directory(args.model):
        from ..demo.hf_directory import load_hf_directory

        if getattr(args, "state_dict", None):
            raise ValueError("--state-dict is for --model package.module:factory; a model directory brings its "
                             "weights (model.safetensors)")
        data = _data(args, need_calibration, demo)   # the inputs' errors before the model's load
        return (load_hf_directory(args.model, "--model"), *data)
    factory = import_factory(args.model)
    if not args.state_dict:
        raise ValueError("--state-dict is required with a user model: pass the trained weights "
                         "(torch.save(model.state_dict(), 'weights.pt'))")
    if need_calibration and not args.calibration:
        raise ValueError("--calibration is required with a user model: pass model inputs saved with "
                         "torch.save(x, 'calib.pt') (a tensor (N, ...) or a list of batches)")
    model = demo.build_user_model(factory, demo.load_state_dict_file(args.state_dict))
    return (model, *_data(args, need_calibration, demo))


def _data(args: argparse.Namespace, need_calibration: bool, demo) -> tuple:
    if need_calibration and not args.calibration:
        raise ValueError("--calibration is required with a user model: pass model inputs saved with "
                         "torch.save(x, 'calib.pt') (a tensor (N, ...), e.g. token ids, or a list of batches)")
    batches = demo.load_calibration_file(args.calibration, args.batch_size) if args.calibration else None
    test = demo.load_test_file(args.test) if args.test else None
    return batches, test
