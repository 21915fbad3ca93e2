"""GGUF block packers against the ``gguf`` package: its reference Q8_0/Q4_0 quantizers (same codes
and bytes when lowbit rounds plainly on the same grid) and its Q4_K dequantizer (an independent
reading of the block layout)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lowbit as lb
from lowbit.export.gguf_quants import gguf_blocks, pack_q4_0, pack_q8_0, unpack_blocks
from lowbit.ops.gguf_grid import fp16_exact, q4_k_decompose, snap_scales

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants  # noqa: E402

G32 = lb.PerGroup(32)


def _weights(rows=24, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.2


def test_q8_0_codes_and_bytes_equal_reference_quantizer():
    w = _weights()
    spec = lb.QuantSpec(bits=8, granularity=G32)
    scale, zp = lb.ops.choose_qparams(w, spec)                    # amax / 127: ggml's choice
    codes = lb.ops.quantize(w, spec, scale, zp)                   # plain rounding with the float32 scale
    ref = quants.quantize(w.numpy(), T.Q8_0)
    got = unpack_blocks(ref, "Q8_0", w.shape[1])
    np.testing.assert_array_equal(got["codes"].astype(np.int64), codes.numpy().astype(np.int64))
    ours = pack_q8_0(codes.numpy(), scale.numpy())                # the scale is stored as fp16, as ggml does
    np.testing.assert_array_equal(ours, ref)


def test_q4_0_codes_and_bytes_equal_reference_quantizer():
    w = _weights(seed=1).reshape(-1, 32)
    # ggml's Q4_0 maps each block's largest-magnitude value to -8 (d = max / -8); lowbit's grid has a
    # positive scale, so the two agree on blocks whose largest-magnitude value is negative
    idx = w.abs().argmax(dim=1, keepdim=True)
    w = (w * -torch.sign(w.gather(1, idx))).reshape(24, 256)
    spec = lb.QuantSpec(bits=4, granularity=G32)
    amax = w.reshape(-1, 32).abs().amax(dim=1).reshape(24, 8)
    scale = amax / 8
    codes = lb.ops.quantize(w, spec, scale, torch.zeros_like(scale, dtype=torch.int32))
    ref = quants.quantize(w.numpy(), T.Q4_0)
    got = unpack_blocks(ref, "Q4_0", 256)
    np.testing.assert_array_equal(got["codes"].astype(np.int64) - 8, codes.numpy().astype(np.int64))
    np.testing.assert_array_equal(pack_q4_0(codes.numpy() + 8, scale.numpy()), ref)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
def test_packed_blocks_dequantize_to_lowbit_values(qtype):
    """gguf.quants' dequantizer reads our blocks to exactly lowbit's dequantized float32 weights."""
    w = _weights(seed=2, cols=512)
    spec = lb.QuantSpec(bits=8 if qtype == "Q8_0" else 4, granularity=G32)
    scale, zp = lb.ops.choose_qparams(w, spec, "mse")
    qt = lb.QTensor.from_float(w, spec, snap_scales(scale, qtype.lower()), zp)
    typ, data = gguf_blocks(qt, prefer=(qtype,))
    assert typ == qtype
    deq = quants.dequantize(data, T[qtype]).reshape(w.shape)
    assert np.array_equal(deq, qt.dequantize().numpy())
    assert np.array_equal(unpack_blocks(data, qtype, 512)["codes"].astype(np.int64) - (0 if qtype == "Q8_0" else 8),
                          qt.int_repr().numpy().astype(np.int64))


def test_q4_k_asymmetric_grid_with_representable_mins():
    """An asymmetric 4-bit grid whose zero points give 6-bit mins is held exactly (dmin != 8 d)."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 4, 256
    d = torch.tensor(2.0 ** -9)
    sc = torch.randint(1, 8, (rows, cols // 32), generator=g).float()
    zp = torch.randint(0, 8, (rows, cols // 32), generator=g).to(torch.int32)
    spec = lb.QuantSpec(bits=4, signed=False, symmetric=False, granularity=G32)
    codes = torch.randint(0, 16, (rows, cols), generator=g)
    qt = lb.QTensor.from_int(codes, spec, d * sc, zp)
    typ, data = gguf_blocks(qt, prefer=("Q4_K",))
    assert typ == "Q4_K", data
    assert np.array_equal(quants.dequantize(data, T.Q4_K).reshape(rows, cols), qt.dequantize().numpy())


def test_snap_scales_are_representable():
    s = torch.rand(6, 16, generator=torch.Generator().manual_seed(6)) * 0.01 + 1e-5
    assert bool(fp16_exact(snap_scales(s, "q8_0")).all())
    k = snap_scales(s, "q4_k")
    d, sc = q4_k_decompose(k)
    assert torch.equal(d.repeat_interleave(8, dim=1) * sc.float(), k) and bool(fp16_exact(d).all())
    assert int(sc.max()) <= 63 and int(sc.min()) >= 1
    step = d.repeat_interleave(8, dim=1)                          # d >= max/63 of its super-block, < 1.001 max/63
    near = (k - s).abs() <= step / 2 * 1.0001                     # the nearest multiple of d ...
    assert bool((near | ((s < step / 2) & (k == step))).all())    # ... but at least d (scales stay > 0)
    assert bool((step <= s.reshape(6, 2, 8).amax(-1).repeat_interleave(8, dim=1) / 63 * 1.001).all())
    odd = snap_scales(torch.rand(3, 12) + 0.1, "q4_k")            # 12 groups: not whole super-blocks -> fp16 (Q4_0)
    assert bool(fp16_exact(odd).all())


def test_grids_no_block_type_holds():
    w = _weights(seed=4)
    qt = lb.QTensor.from_float(w, lb.QuantSpec(bits=4, granularity=lb.PerGroup(128)))
    typ, why = gguf_blocks(qt)
    assert typ is None and "PerGroup(32)" in why
    qt = lb.QTensor.from_float(w, lb.QuantSpec(bits=4, granularity=G32))   # float32 scales, not fp16
    typ, why = gguf_blocks(qt)
    assert typ is None and "fp16" in why


def test_q5_0_blocks_dequantize_to_lowbit_values():
    w = _weights(seed=5)
    spec = lb.QuantSpec(bits=5, granularity=G32)
    scale, zp = lb.ops.choose_qparams(w, spec)
    qt = lb.QTensor.from_float(w, spec, snap_scales(scale, "q5_0"), zp)
    typ, data = gguf_blocks(qt)
    assert typ == "Q5_0"
    assert np.array_equal(quants.dequantize(data, T.Q5_0).reshape(w.shape), qt.dequantize().numpy())
    assert np.array_equal(unpack_blocks(data, "Q5_0", 256)["codes"].astype(np.int64) - 16,
                          qt.int_repr().numpy().astype(np.int64))


def test_gguf_grid_q4_k_falls_back_to_q5_0_on_short_rows():
    from lowbit.transforms import gguf_grid

    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.Linear(64, 384), torch.nn.Linear(384, 8))
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=G32))
    assert gguf_grid(q, "q4_k") == {"0": "q4_k", "1": "q5_0", "2": "q5_0"}
    assert q[1].weight_quant.spec.bits == 5 and q[0].weight_quant.spec.bits == 4
    lb.freeze(q)
    assert [gguf_blocks(q[i].qweight)[0] for i in range(3)] == ["Q4_K", "Q5_0", "Q5_0"]
    q = lb.quantize(model, weights=lb.QuantSpec(bits=4, granularity=G32))
    assert gguf_grid(q, "q4_k", fallback="q4_0")["2"] == "q4_0"
    assert gguf_blocks(lb.freeze(q)[2].qweight)[0] == "Q4_0"
