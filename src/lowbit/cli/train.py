"""``lowbit train``: QAT fine-tuning of a built-in or user model (parsing and progress display only).

    lowbit train --model mnist1d --weights 2 --activations 8 --epochs 5 --out runs/w2a8 [--json]
    lowbit train ... --resume                        # continue an interrupted run
    lowbit train ... --nproc 2                       # DistributedDataParallel on 2 local processes
    torchrun --nproc-per-node 2 -m lowbit train ...  # the same, launched by torchrun
    lowbit train --model mymodels:make_net --state-dict net.pt --train train.pt [--test test.pt] --out runs/net

The work is :func:`lowbit.train.run`; this module turns strings into a ``RunConfig``.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ..train import RunConfig, TrainingStopped, init_from_env, spawn
from ..train import run as run_training

__all__ = ["ProgressBar"]

NAME = "train"
HELP = "quantization-aware training of a built-in or user model"
ORDER = 30


def _bits(text: str) -> int | None:
    if text.lower() in ("0", "none", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit width (2..16) or 0/none for float, got {text!r}") from None


class ProgressBar:
    """Progress on stderr: a carriage-return bar per epoch when stderr is a terminal, and one line
    per finished epoch always. Picklable, so ``--nproc`` can hand it to rank 0."""

    def __init__(self, width: int = 30) -> None:
        self.width = width

    def __call__(self, event: dict) -> None:
        err = sys.stderr
        kind = event.get("kind")
        if kind == "step" and err.isatty():
            done = event["step"] / event["steps"]
            bar = "#" * int(done * self.width) + "." * (self.width - int(done * self.width))
            err.write(f"\repoch {event['epoch']}/{event['epochs']} [{bar}] {event['step']}/{event['steps']}")
            err.flush()
        elif kind == "epoch":
            test = event.get("test_accuracy")
            err.write(("\r" if err.isatty() else "") +
                      f"epoch {event['epoch']}/{event['epochs']}  loss {event['loss']:.4f}  train {event['train_accuracy']:.2%}"
                      + ("" if test is None else f"  test {test:.2%}") + f"  {event['seconds']:.1f}s" + " " * 10 + "\n")
            err.flush()
        elif kind == "stage":
            err.write(event["message"] + "\n")
            err.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``lowbit train``."""
    d = RunConfig()
    p.add_argument("--model", default=d.model, metavar="NAME|package.module:factory",
                   help="built-in model (mnist1d, digits; default %(default)s) or a user classifier factory with "
                        "--state-dict and --train (and optionally --test)")
    g = p.add_argument_group("user model (--model package.module:factory)")
    g.add_argument("--state-dict", metavar="PATH", help="trained float weights of the user model")
    g.add_argument("--train", metavar="PATH", help="training data (.pt): (inputs, labels) or {'inputs', 'labels'}")
    g.add_argument("--test", metavar="PATH", help="test data (.pt) in the same form (default: the training data)")
    p.add_argument("--weights", type=int, default=d.weights, metavar="BITS", help="weight bits (default %(default)s)")
    p.add_argument("--activations", type=_bits, default=d.activations, metavar="BITS",
                   help="activation bits, 0 or none for float activations (default %(default)s)")
    p.add_argument("--rounding", default=d.rounding, choices=["nearest", "stochastic"],
                   help="weight rounding during training (evaluation always rounds to nearest)")
    p.add_argument("--surrogate", default=d.surrogate, choices=["ste", "noise"],
                   help="ste: round with a straight-through gradient; noise: uniform noise of one step instead")
    p.add_argument("--ste", default=d.ste, choices=["identity", "clipped"], help="straight-through estimator")
    p.add_argument("--no-learn-scales", dest="learn_scales", action="store_false",
                   help="keep the PTQ grids instead of learning step sizes (LSQ)")
    p.add_argument("--act-learning", default=d.act_learning, choices=["lsq", "pact"],
                   help="how activation ranges learn (default %(default)s)")
    p.add_argument("--scale-init", default=d.scale_init, choices=["observer", "lsq"], help="initial weight step")
    p.add_argument("--observer", default=d.observer, help="range method of the PTQ initialisation (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="run directory: checkpoint.pt each epoch, model.safetensors, result.json "
                        "(default lowbit-train-MODEL-wWaA)")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--nproc", type=int, default=1, help="train on N local processes (DistributedDataParallel)")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"], help="torch.distributed backend")


def run(args: argparse.Namespace) -> dict | None:
    config = RunConfig(model=args.model, weights=args.weights, activations=args.activations, observer=args.observer,
                       rounding=args.rounding, surrogate=args.surrogate, learn_scales=args.learn_scales,
                       act_learning=args.act_learning, scale_init=args.scale_init, ste=args.ste, epochs=args.epochs,
                       lr=args.lr, batch_size=args.batch_size, weight_decay=args.weight_decay, seed=args.seed,
                       threads=args.threads)
    user = _user_model(args)
    stem = args.model.replace(":", "-").replace(".", "-")
    out = args.out or f"lowbit-train-{stem}-w{args.weights}a{args.activations or 'f'}"
    logging.getLogger("lowbit.zoo.training").setLevel(logging.WARNING)  # the bar shows the epochs
    bar = ProgressBar()
    try:
        if args.nproc > 1:
            if user is not None:
                raise ValueError("--nproc > 1 takes built-in models only; train a user model with --nproc 1 "
                                 "(or launch it with torchrun)")
            result = spawn(args.nproc, config, out, resume=args.resume, progress=bar, backend=args.backend)[0]
        else:
            init_from_env(args.backend)
            model, dataset = user if user is not None else (None, None)
            result = run_training(config, out, resume=args.resume, progress=bar, model=model, dataset=dataset)
            if result["world_size"] > 1 and _rank() != 0:
                return None  # torchrun: rank 0 reports
    except TrainingStopped as e:
        raise ValueError(str(e)) from e
    result["results"] = [{"stage": s, "accuracy": result[k]["accuracy"]}
                         for s, k in (("float", "float"), ("ptq", "ptq"), ("qat", "quantized"))]
    return result


def _user_model(args: argparse.Namespace):
    """``(float_model, Dataset)`` for ``--model package.module:factory``, else None (built-in model)."""
    from .. import demo, zoo
    from ._args import import_factory, is_factory

    from ._user import is_directory

    if is_directory(args.model):
        raise ValueError(f"--model {args.model!r}: lowbit train takes a built-in model or package.module:factory "
                         "(a classifier trained on --train (inputs, labels)); a Hugging Face model directory is "
                         "quantized, analysed and exported from the command line, not trained: build it in a factory "
                         "that returns a module mapping inputs to logits")
    if not is_factory(args.model):
        for flag in ("state_dict", "train", "test"):
            if getattr(args, flag, None):
                raise ValueError(f"--{flag.replace('_', '-')} is for user models (--model package.module:factory); "
                                 f"built-in model {args.model!r} brings its own weights and data")
        if args.model not in ("mnist1d", "digits"):
            raise ValueError(f"--model must be mnist1d, digits or package.module:factory, got {args.model!r}")
        return None
    factory = import_factory(args.model)
    if not args.state_dict or not args.train:
        raise ValueError("a user model needs --state-dict (its trained float weights) and --train (a .pt file "
                         "holding (inputs, labels): QAT trains on it)")
    model = demo.build_user_model(factory, demo.load_state_dict_file(args.state_dict))
    x, y = demo.load_test_file(args.train)
    xt, yt = demo.load_test_file(args.test) if args.test else (x, y)
    if y is None or yt is None:
        raise ValueError("--train and --test must hold labels: torch.save((inputs, labels), path) with class indices")
    num_classes = int(max(y.max(), yt.max())) + 1
    return model, zoo.Dataset(name=args.model, x_train=x.float(), y_train=y.long(), x_test=xt.float(),
                              y_test=yt.long(), num_classes=num_classes, mean=0.0, std=1.0, source=args.test or args.train)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
