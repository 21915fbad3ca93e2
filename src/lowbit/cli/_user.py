"""A user's model on the command line, as ``lowbit quantize`` takes it: ``--model package.module:factory``
(called with no arguments) ``--state-dict FILE`` (``torch.save(model.state_dict())`` or .safetensors)
``--calibration FILE.pt`` (a tensor of inputs split into ``--batch-size`` rows, or a list of batches)
and optionally ``--test FILE.pt`` (inputs, or ``(inputs, labels)``)."""
from __future__ import annotations

import argparse

from ._args import import_factory, positive_int

__all__ = ["add_arguments", "load", "check_unused"]

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

    factory = import_factory(args.model)
    if not args.state_dict:
        raise ValueError("--state-dict is required with a user model: pass the trained weights "
                         "(torch.save(model.state_dict(), 'weights.pt'))")
    if need_calibration and not args.calibration:
        raise ValueError("--calibration is required with a user model: pass model inputs saved with "
                         "torch.save(x, 'calib.pt') (a tensor (N, ...) or a list of batches)")
    model = demo.build_user_model(factory, demo.load_state_dict_file(args.state_dict))
    batches = demo.load_calibration_file(args.calibration, args.batch_size) if args.calibration else None
    test = demo.load_test_file(args.test) if args.test else None
    return model, batches, test
