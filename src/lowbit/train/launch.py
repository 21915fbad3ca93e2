"""Running :func:`lowbit.train.run` on several processes (DistributedDataParallel).

Two ways, same result:

* ``torchrun --nproc-per-node 2 -m lowbit train ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` joins the group;
* ``lowbit train --nproc 2 ...``: :func:`spawn` starts the processes itself with
  ``torch.multiprocessing`` on ``127.0.0.1`` and a free port.

The backend is ``nccl`` when CUDA is available (one GPU per process, ``LOCAL_RANK``), else ``gloo``.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch
from torch.multiprocessing.spawn import ProcessException

from .config import RunConfig
from .run import TrainingStopped, run

__all__ = ["init_from_env", "spawn", "free_port", "default_backend"]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() and torch.distributed.is_nccl_available() else "gloo"


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group described by torchrun's environment variables, if they are set
    (and no group exists yet); returns True when running distributed."""
    import torch.distributed as dist

    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, config: RunConfig, out_dir: str, resume: bool,
            progress, model, dataset, queue) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    try:
        result = run(config, out_dir, resume=resume, progress=progress if rank == 0 else None, model=model,
                     dataset=dataset)
        queue.put((rank, "ok", result))
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        queue.put((rank, type(e).__name__, str(e)))
        raise  # a failed process makes torch.multiprocessing stop the others (they may wait in a collective)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError,
           "FloatingPointError": TrainingStopped, "TrainingStopped": TrainingStopped}


def spawn(nproc: int, config: RunConfig, out_dir: str | os.PathLike, *, resume: bool = False, progress=None,
          backend: str | None = None, model=None, dataset=None) -> list[dict]:
    """Run ``config`` on ``nproc`` local processes; returns every rank's result, rank order.

    ``progress`` (rank 0 only), ``model`` and ``dataset`` (see :func:`lowbit.train.run`) are
    pickled to the processes. An error raised on a rank is raised here again
    with its message (``ValueError``, ``TrainingStopped``, ...).
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < nproc:
        raise ValueError(f"nproc={nproc} processes with nccl need as many GPUs; {torch.cuda.device_count()} found "
                         "(use backend='gloo' to run on the CPU)")
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    args = (nproc, free_port(), backend, config, str(out_dir), resume, progress, model, dataset, queue)
    failure = None
    try:
        torch.multiprocessing.start_processes(_worker, args=args, nprocs=nproc, join=True, start_method="spawn")
    except ProcessException as e:
        failure = e
    results, errors = {}, []
    while not queue.empty():
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = payload
        else:
            errors.append((rank, status, payload))
    if errors:
        rank, status, message = sorted(errors)[0]
        raise _ERRORS.get(status, RuntimeError)(message) from failure
    if failure is not None:
        raise RuntimeError(f"a training process failed: {failure}") from failure
    return [results[r] for r in range(nproc)]
