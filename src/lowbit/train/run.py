"""One QAT fine-tuning run of a built-in model: PTQ init, QAT epochs, per-epoch checkpoints, freeze.

The standard recipe (Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient
inference", Sec. 3.2; Esser et al. 2020): start from the trained float model, quantize it with
PTQ (calibrated ranges), then fine-tune *through* the quantizers with a small learning rate.

Steps of :func:`run`:

1. load the trained float model (``zoo.load_model``) and its data; evaluate it;
2. ``lb.quantize`` + ``lb.calibrate`` (each rank calibrates on its share of the calibration
   batches, and the observers are all-reduced: :func:`lowbit.qat.sync_calibration`); evaluate (PTQ);
3. ``lb.qat.prepare`` with the recipe's options; restore the checkpoint if resuming;
4. train with ``zoo.train`` (deterministic and resumable; under ``torch.distributed`` the model is
   wrapped in ``DistributedDataParallel`` and each rank trains on ``perm[rank::world]``), writing
   ``DIR/checkpoint.pt`` atomically after every epoch (rank 0);
5. evaluate, ``lb.freeze`` (the learned grids become fixed), evaluate again, ``lb.save`` to
   ``DIR/model.safetensors`` and write ``DIR/result.json``.

A non-finite loss stops the run with :class:`TrainingStopped`, leaving the last good checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import zoo
from ..checkpoint import atomic_write, save
from ..qat import prepare, qparams_digest, replicas_agree, rng_state, set_rng_state, sync_calibration
from ..quantize import calibrate, freeze, quantize
from .checkpoint import CHECKPOINT_NAME, check_fits, read_checkpoint, write_checkpoint
from .config import RunConfig, model_fingerprint

__all__ = ["run", "TrainingStopped", "MODEL_FILE", "RESULT_FILE"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
RESULT_FILE = "result.json"


class TrainingStopped(FloatingPointError):
    """Training hit a non-finite loss; the message names the last good checkpoint."""


def _dist_info():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.get_backend()
    return 0, 1, None


def _device(backend: str | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _ptq(float_model: nn.Module, config: RunConfig, data, rank: int, world: int, device) -> nn.Module:
    q = quantize(float_model, weights=config.weight_spec(), activations=config.activation_spec(),
                 observer=config.observer).to(device)
    if config.activations is not None:
        batches = zoo.calibration_batches(data, num_batches=config.calibration_batches, seed=config.seed)
        if len(batches) < world:
            raise ValueError(f"calibration_batches={config.calibration_batches} gives {len(batches)} batches for "
                             f"{world} processes; use at least one per process")
        with calibrate(q):
            for b in batches[rank::world]:
                q(b.to(device))
            if world > 1:
                sync_calibration(q)
    return q


def _digest_hash(q: nn.Module) -> str:
    return hashlib.sha256(qparams_digest(q).cpu().numpy().tobytes()).hexdigest()[:16]


def _step_hook(progress, steps: int, epochs: int, start: int):
    count = {"n": start * steps}

    def hook(module, inputs, output):
        if module.training and torch.is_grad_enabled():
            count["n"] += 1
            epoch, step = divmod(count["n"] - 1, steps)
            progress({"kind": "step", "epoch": epoch + 1, "epochs": epochs, "step": step + 1, "steps": steps})
    return hook


def run(config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False,
        progress: Callable[[dict], None] | None = None, model: nn.Module | None = None,
        dataset: zoo.Dataset | None = None, device=None) -> dict:
    """Run (or, with ``resume=True``, continue) the QAT recipe ``config``, writing into ``out_dir``.

    Under ``torch.distributed`` (initialised by the caller, e.g. ``torchrun`` or
    :func:`lowbit.train.spawn`) every rank calls it; rank 0 writes the files. ``progress`` receives
    ``{"kind": "step" | "epoch" | "stage", ...}`` events on rank 0. ``model`` (a trained float model,
    left untouched) and ``dataset`` (a :class:`lowbit.zoo.Dataset`) replace the built-in ones
    named by ``config.model``. Returns the result dict (see ``lowbit train --json``).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config must be a lowbit.train.RunConfig, got {type(config).__name__}")
    rank, world, backend = _dist_info()
    device = _device(backend, device)
    emit = progress if (progress is not None and rank == 0) else (lambda event: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} is a file; pass a directory")
    ckpt_path = out / CHECKPOINT_NAME
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        data = dataset if dataset is not None else zoo.dataset_of(config.model)
        if model is None:
            float_model = zoo.load_model(config.model).to(device)
        elif not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the trained float model), got {type(model).__name__}")
        else:
            float_model = copy.deepcopy(model).to(device).eval()
        fingerprint = model_fingerprint(float_model)
        saved = None
        if ckpt_path.exists():
            if not resume:
                raise ValueError(f"{str(out)!r} already holds a checkpoint ({CHECKPOINT_NAME}); pass --resume "
                                 "(resume=True) to continue it, or choose another --out directory")
            saved = read_checkpoint(ckpt_path)
            check_fits(saved, config.recipe(), fingerprint, world, ckpt_path)
        elif resume:
            log.info("no checkpoint in %s: starting from the beginning", out)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)

        emit({"kind": "stage", "message": f"float {config.model}, PTQ init (W{config.weights}A{config.activations or 'float'})"})
        float_acc = zoo.evaluate(float_model, data.x_test, data.y_test)
        q = _ptq(float_model, config, data, rank, world, device)
        ptq_acc = zoo.evaluate(q, data.x_test, data.y_test)
        ptq_digest = _digest_hash(q)
        prepare(q, config.qat_config())
        history: list[dict] = []
        start = 0
        if saved is not None:
            q.load_state_dict(saved["model"])
            set_rng_state(q, saved["rng"])
            history = list(saved["history"])
            start = int(saved["epoch"]) + 1
            emit({"kind": "stage", "message": f"resuming after epoch {start} of {config.epochs}"})
        net = q
        if world > 1:
            net = nn.parallel.DistributedDataParallel(q, device_ids=[device] if device.type == "cuda" else None)

        def on_epoch(stats: zoo.EpochStats, state: dict) -> None:
            rec = {"epoch": stats.epoch + 1, "loss": stats.loss, "train_accuracy": stats.train_accuracy,
                   "test_accuracy": zoo.evaluate(q, data.x_test, data.y_test) if rank == 0 else None,
                   "seconds": stats.seconds, "lr": stats.lr}
            history.append(rec)
            if rank == 0:
                write_checkpoint(ckpt_path, {
                    "recipe": config.recipe(), "world_size": world,
                    "float_model": {"name": config.model, "fingerprint": fingerprint},
                    "epoch": stats.epoch, "model": q.state_dict(), "rng": rng_state(q), "train_state": state,
                    "history": history, "baseline": {"float": float_acc, "ptq": ptq_acc}})
            emit({"kind": "epoch", "epochs": config.epochs, **rec})

        n = len(range(rank, len(data.x_train), world))
        steps = math.ceil(n / config.batch_size)
        hook = q.register_forward_hook(_step_hook(emit, steps, config.epochs, start)) if progress else None
        train_config = zoo.TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                       weight_decay=config.weight_decay, seed=config.seed, threads=config.threads)
        try:
            zoo.train(net, data, train_config, callback=on_epoch,
                      resume=None if saved is None else saved["train_state"], shard=(rank, world), eval_test=False)
        except FloatingPointError as e:
            good = (f"the last good checkpoint is {str(ckpt_path)!r} (after epoch {len(history)}); resume from it "
                    "after fixing the cause" if history else "no epoch finished, so no checkpoint was written")
            raise TrainingStopped(f"training stopped: {e}. {good}") from e
        finally:
            if hook is not None:
                hook.remove()

        qat_acc = zoo.evaluate(q, data.x_test, data.y_test)
        agree = replicas_agree(q) if world > 1 else True
        digest = _digest_hash(q)
        freeze(q)
        frozen_acc = zoo.evaluate(q, data.x_test, data.y_test)
        result = {
            "model": config.model, "recipe": config.recipe(), "world_size": world,
            "float": {"accuracy": float_acc}, "ptq": {"accuracy": ptq_acc, "qparams_sha256": ptq_digest},
            "quantized": {"accuracy": frozen_acc, "unfrozen_accuracy": qat_acc},
            "epochs": history, "resumed_after_epoch": start if saved is not None else None,
            "qparams_sha256": digest, "replicas_agree": agree,
            "checkpoint": str(ckpt_path), "model_file": str(out / MODEL_FILE),
            "seconds": {"wall": time.perf_counter() - t_wall, "cpu": time.process_time() - t_cpu},
        }
        if rank == 0:
            save(q, out / MODEL_FILE)
            atomic_write(out / RESULT_FILE, json.dumps(result, indent=2).encode())
        return result
    finally:
        torch.set_num_threads(old_threads)
