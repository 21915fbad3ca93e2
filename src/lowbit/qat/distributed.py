"""QAT across processes (``torch.distributed``): identical grids on every rank.

Data-parallel training (``DistributedDataParallel``) keeps replicas identical because every rank
applies the same averaged gradient to the same parameters. For quantized models that covers the
learned step sizes (they are ``nn.Parameter`` s); the rest must be made identical on purpose:

* **Calibration**: each rank sees its own shard of the calibration data, so its observers hold
  different statistics. :func:`sync_calibration` all-reduces them (``Observer.all_reduce``: min/max,
  histograms and sums merge exactly) inside the ``lb.calibrate`` block, so every rank fixes the
  same range, the one a single process would find on all the shards.
* **Weight grids that are not learned** are a deterministic function of the weight
  (``ops.choose_qparams``), hence identical once the weights are.
* **Random rounding / noise** uses per-quantizer generators seeded identically on every rank, so
  each rank draws the same weight realisation, as one process with the whole batch would.

:func:`replicas_agree` checks the result: it gathers every scale and zero point and compares them
bit for bit.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modules import ActQuantizer
from .prepare import qparams

__all__ = ["sync_calibration", "replicas_agree", "qparams_digest"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group "
                         "first (or use these helpers only when running distributed)")
    return dist


def sync_calibration(q: nn.Module, group=None) -> int:
    """All-reduce the statistics of every observing activation quantizer of ``q`` (a collective).

    Call it inside ``with lb.calibrate(q):`` after running this rank's calibration batches; on
    exit every rank fixes identical ranges. Every rank must have run at least one batch.
    Returns the number of observers reduced.
    """
    _dist()
    count = 0
    for _, m in q.named_modules():
        if isinstance(m, ActQuantizer) and m.observing and m.observer is not None:
            m.observer.all_reduce(group)
            m.batches_seen = m.observer.batches
            count += 1
    if count == 0:
        raise ValueError("no activation quantizer is observing: call sync_calibration inside "
                         "`with lb.calibrate(q):`, after running the calibration batches")
    return count


def qparams_digest(q: nn.Module) -> torch.Tensor:
    """Every scale and zero point of ``q`` (see :func:`lowbit.qat.qparams`) as one float64 vector,
    in a fixed order (sorted names); equal vectors mean bit-identical grids."""
    params = qparams(q)
    parts = [params[k].reshape(-1).to(torch.float64) for k in sorted(params)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def replicas_agree(q: nn.Module, group=None) -> bool:
    """True if every rank of ``group`` holds bit-identical scales and zero points (a collective)."""
    dist = _dist()
    mine = qparams_digest(q)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    return all(torch.equal(mine.view(torch.int64), other.view(torch.int64)) for other in everyone)
