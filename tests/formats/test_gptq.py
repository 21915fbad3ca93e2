"""GPTQ rounds each column to the format's grid: it beats round-to-nearest on correlated inputs
for every format, its result lies exactly on the grid, and freeze reproduces it."""
import pytest
import torch
from torch import nn

import lowbit as lb
from lowbit import ops


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g) * torch.logspace(0, -1.5, d)[:, None]
    return torch.randn(n, d, generator=g) @ a


def _out_err(dw, x):
    return float((x.double() @ dw.double().T).square().sum(1).mean())


SPECS = {
    "nf4": lb.QuantSpec(format="nf4"),
    "nf4_dq": lb.QuantSpec(format="nf4_dq"),
    "fp8_e4m3": lb.QuantSpec(format="fp8_e4m3", granularity=lb.PerChannel(0)),
    "fp8_e5m2": lb.QuantSpec(format="fp8_e5m2", granularity=lb.PerChannel(0)),
    "mxfp4": lb.QuantSpec(format="mxfp4"),
    "mxint8": lb.QuantSpec(format="mxint8"),
    "nvfp4": lb.QuantSpec(format="nvfp4"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_beats_round_to_nearest(name):
    spec = SPECS[name]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(128, 48))
    x = _correlated(1024, 128, seed=1)
    q = lb.quantize(m, weights=spec)
    w = m[0].weight.detach()
    rtn = ops.fake_quantize(w, spec, *ops.choose_qparams(w, spec))
    lb.gptq(q, list(x.split(256)))
    wq = q[0].weight.detach()
    err_rtn, err_gptq = _out_err(w - rtn, x), _out_err(w - wq, x)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)   # measured 0.21..0.26
    held_out = _correlated(2048, 128, seed=1)[1024:]
    assert _out_err(w - wq, held_out) < _out_err(w - rtn, held_out)
    # exactly on the grid it reports, and freeze stores exactly that
    wqz = q[0].weight_quant
    assert torch.equal(ops.fake_quantize(wq, spec, wqz.scale, wqz.zero_point), wq)
    y = q(x[:8])
    lb.freeze(q)
    assert torch.equal(q(x[:8]), y)
