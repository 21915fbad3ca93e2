"""Observer.all_reduce over torch.distributed (gloo, two processes) equals one observer over all data."""
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lowbit import PerChannel, QuantSpec
from lowbit.observers import MSE, Entropy, MinMax, MovingAverage, NotCalibratedError, Percentile

SPEC = QuantSpec(bits=4, granularity=PerChannel(1))


def _shard(rank):
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(8, 3, 20, generator=g) * (1 + 3 * rank) for _ in range(3)]


def _observers():
    return [MinMax(SPEC), Percentile(SPEC, p=99.0), MSE(SPEC), Entropy(SPEC, bins=64), MovingAverage(SPEC, 0.3)]


def _worker(rank, world, init_file, out_file):
    # a rank that fails makes the other wait in a collective: time out instead of hanging the suite
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        observers = _observers()
        for obs in observers:
            for x in _shard(rank):
                obs.update(x)
            obs.all_reduce()
        lonely = MinMax(SPEC)
        if rank == 0:
            lonely.update(_shard(0)[0])
        try:
            lonely.all_reduce()
            raised = False
        except NotCalibratedError:
            raised = True
        if rank == 0:
            torch.save({"states": [o.state_dict() for o in observers],
                        "qparams": [o.qparams() for o in observers], "raised": raised}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_all_reduce_across_two_processes_equals_one_observer(tmp_path, monkeypatch):
    # spawned processes unpickle _worker by its module name (tests.observers...), so the repository
    # root must be on their sys.path even when pytest (importlib mode) does not put it there
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out)
    assert got["raised"]  # a rank without data makes every rank raise, none hangs
    for obs, state, (scale, zp) in zip(_observers(), got["states"], got["qparams"]):
        for rank in range(2):
            for x in _shard(rank):
                obs.update(x)
        if isinstance(obs, MovingAverage):  # batch-weighted mean of the two ranks' averages
            a, b = MovingAverage(SPEC, 0.3), MovingAverage(SPEC, 0.3)
            for x in _shard(0):
                a.update(x)
            for x in _shard(1):
                b.update(x)
            obs = a.merge(b)
        for k, v in obs.state_dict().items():
            assert torch.allclose(state[k].to(v.dtype), v), (type(obs).__name__, k)
        assert torch.allclose(scale, obs.qparams()[0])


def test_all_reduce_without_a_process_group_says_so():
    with pytest.raises(RuntimeError, match="init_process_group"):
        MinMax(SPEC).update(torch.randn(2, 3)).all_reduce()
