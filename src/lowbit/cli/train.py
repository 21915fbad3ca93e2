"""``lowbit train``: QAT fine-tuning of a built-in model (parsing and progress display only).

    lowbit train --model mnist1d --weights 2 --activations 8 --epochs 5 --out runs/w2a8 [--json]
    lowbit train ... --resume                        # continue an interrupted run
    lowbit train ... --nproc 2                       # DistributedDataParallel on 2 local processes
    torchrun --nproc-per-node 2 -m lowbit train ...  # the same, launched by torchrun

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
HELP = "quantization-aware training of a built-in model"
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
    p.add_argument("--model", default=d.model, choices=["mnist1d", "digits"], help="built-in model (default %(default)s)")
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
    out = args.out or f"lowbit-train-{args.model}-w{args.weights}a{args.activations or 'f'}"
    logging.getLogger("lowbit.zoo.training").setLevel(logging.WARNING)  # the bar shows the epochs
    bar = ProgressBar()
    try:
        if args.nproc > 1:
            result = spawn(args.nproc, config, out, resume=args.resume, progress=bar, backend=args.backend)[0]
        else:
            init_from_env(args.backend)
            result = run_training(config, out, resume=args.resume, progress=bar)
            if result["world_size"] > 1 and _rank() != 0:
                return None  # torchrun: rank 0 reports
    except TrainingStopped as e:
        raise ValueError(str(e)) from e
    result["results"] = [{"stage": s, "accuracy": result[k]["accuracy"]}
                         for s, k in (("float", "float"), ("ptq", "ptq"), ("qat", "quantized"))]
    return result


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0
