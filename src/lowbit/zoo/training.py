"""A small, deterministic classification training loop (reused by quantization-aware training).

Loss: cross-entropy. Optimizer: AdamW (Loshchilov & Hutter, ICLR 2019). Schedule: one-cycle
(Smith & Topin 2017, ``torch.optim.lr_scheduler.OneCycleLR``: warm up to ``lr`` over the first
30% of the steps, cosine-anneal to ``lr / 1e4``), or a constant rate.

Determinism: the order of epoch ``e`` is ``randperm`` under a generator seeded with
``seed * 1_000_003 + e``, and the global RNG (dropout, stochastic layers) is re-seeded the same way
at the start of each epoch inside ``torch.random.fork_rng``, so the caller's RNG state is left as
it was and a run resumed at epoch ``e`` (see ``resume``) sees exactly the data and randomness of an
uninterrupted run. The thread count is fixed for the run (``threads``, default 1: these models
are too small to gain from more, and one thread stays fast when cores are shared, as under
``pytest -n 2``; measured 2.0 s CPU on 1 thread versus 34 s CPU on 2 threads on a loaded 2-core
machine) and restored afterwards.
Nothing here calls an operation that ``torch.use_deterministic_algorithms(True)`` refuses.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import Dataset, iterate_batches

__all__ = ["TrainConfig", "EpochStats", "train", "evaluate", "predict"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe; every field goes into the zoo's cache key."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 1e-4
    schedule: str = "onecycle"   # "onecycle" or "constant"
    seed: int = 0
    threads: int | None = 1      # None: leave torch's thread count alone

    def __post_init__(self) -> None:
        for f in ("epochs", "batch_size"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f} must be an int >= 1; got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be None or an int >= 1; got {self.threads!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number; got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a number >= 0; got {self.weight_decay!r}")
        if self.schedule not in ("onecycle", "constant"):
            raise ValueError(f"schedule must be 'onecycle' or 'constant'; got {self.schedule!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: mean training loss and accuracy (on the batches as trained), test
    accuracy (eval mode, or None when ``eval_test=False``), seconds, and the learning rate at its end."""

    epoch: int
    loss: float
    train_accuracy: float
    test_accuracy: float | None
    seconds: float
    lr: float


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in eval mode without gradients, on the CPU, ``(N, classes)``.

    The model's train/eval mode is restored afterwards.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    was_training = model.training
    device = _device_of(model)
    model.eval()
    try:
        with torch.no_grad():
            outs = [model(xb.to(device)).float().cpu() for xb in iterate_batches(x, batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in [0, 1]: ``mean(argmax(model(x)) == y)``, eval mode, no gradients."""
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must be a 1-D tensor of labels with len(y) == len(x) == {len(x)}")
    if len(y) == 0:
        raise ValueError("x and y are empty; pass at least one sample")
    return (predict(model, x, batch_size).argmax(1) == y.cpu()).double().mean().item()


def _scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def train(model: nn.Module, dataset: Dataset, config: TrainConfig = TrainConfig(), *,
          callback: Callable[[EpochStats, dict], bool | None] | None = None,
          resume: dict | None = None, shard: tuple[int, int] | None = None,
          eval_test: bool = True) -> list[EpochStats]:
    """Train ``model`` in place on ``dataset``'s train split; returns one :class:`EpochStats` per epoch run.

    - ``callback(stats, state)`` runs after each epoch; ``state`` is ``{"epoch", "optimizer",
      "scheduler", "config"}`` (state dicts, to save with the model's for ``resume``). Returning
      ``False`` stops training early.
    - ``resume``: such a ``state``; the model must already hold that epoch's weights. Training
      continues at ``state["epoch"] + 1`` and ends with the same weights as an uninterrupted run.
    - ``shard=(rank, world_size)``: each epoch's permutation is split ``perm[rank::world_size]``,
      for DistributedDataParallel (wrap the model yourself; all ranks must use the same config).
    - A non-finite loss raises ``FloatingPointError`` before the optimizer step that would apply
      it: parameters keep their last finite values (BatchNorm running statistics have already
      seen the bad batch; restore a checkpoint saved by the callback to continue).

    Works for any model whose parameters are on one device; batches are moved there.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"dataset must be a lowbit.zoo.Dataset; got {type(dataset).__name__}")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a lowbit.zoo.TrainConfig; got {type(config).__name__}")
    rank, world = _check_shard(shard)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters; set requires_grad=True on some")
    device = _device_of(model)
    n = len(dataset.x_train)
    steps_per_epoch = math.ceil(len(range(rank, n, world)) / config.batch_size)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = _scheduler(opt, config, steps_per_epoch)
    start = 0
    if resume is not None:
        start = _load_resume(resume, config, opt, sched)
    old_threads = torch.get_num_threads()
    history: list[EpochStats] = []
    try:
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        for epoch in range(start, config.epochs):
            stats = _one_epoch(model, dataset, config, opt, sched, epoch, device, rank, world, eval_test)
            history.append(stats)
            log.info("epoch %d/%d loss %.4f train %.4f test %s lr %.2e (%.2fs)", epoch + 1, config.epochs,
                     stats.loss, stats.train_accuracy,
                     "-" if stats.test_accuracy is None else f"{stats.test_accuracy:.4f}", stats.lr, stats.seconds)
            if callback is not None:
                state = {"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "config": config.as_dict()}
                if callback(stats, state) is False:
                    log.info("callback stopped training after epoch %d", epoch + 1)
                    break
    finally:
        torch.set_num_threads(old_threads)
    return history


def _one_epoch(model, dataset, config, opt, sched, epoch, device, rank, world, eval_test) -> EpochStats:
    t0 = time.perf_counter()
    epoch_seed = config.seed * 1_000_003 + epoch
    order = torch.randperm(len(dataset.x_train), generator=torch.Generator().manual_seed(epoch_seed))
    order = order[rank::world]
    total_loss, correct, seen = 0.0, 0, 0
    model.train()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(epoch_seed)
        for step, (xb, yb) in enumerate(iterate_batches(dataset.x_train, config.batch_size,
                                                         y=dataset.y_train, order=order)):
            xb, yb = xb.to(device), yb.to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at epoch {epoch + 1} step {step + 1}; "
                    f"lower lr (now {config.lr}) or check the model and data for inf/nan")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum().item()
            seen += len(yb)
    test_acc = evaluate(model, dataset.x_test, dataset.y_test) if eval_test else None
    return EpochStats(epoch=epoch, loss=total_loss / max(seen, 1), train_accuracy=correct / max(seen, 1),
                      test_accuracy=test_acc, seconds=time.perf_counter() - t0,
                      lr=opt.param_groups[0]["lr"])


def _check_shard(shard) -> tuple[int, int]:
    if shard is None:
        return 0, 1
    if (not isinstance(shard, tuple) or len(shard) != 2 or not all(isinstance(v, int) for v in shard)
            or not 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size; got {shard!r}")
    return shard


def _load_resume(resume: dict, config: TrainConfig, opt, sched) -> int:
    if not isinstance(resume, dict) or not {"epoch", "optimizer", "scheduler", "config"} <= set(resume):
        raise ValueError("resume must be the state dict a train() callback received "
                         "(keys epoch, optimizer, scheduler, config)")
    if resume["config"] != config.as_dict():
        diff = {k: (resume["config"].get(k), v) for k, v in config.as_dict().items() if resume["config"].get(k) != v}
        raise ValueError(f"resume state comes from a different TrainConfig; differing fields (saved, now): {diff}")
    opt.load_state_dict(resume["optimizer"])
    sched.load_state_dict(resume["scheduler"])
    return int(resume["epoch"]) + 1
