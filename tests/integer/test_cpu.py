"""lowbit.integer.cpu: which int8 formats cannot saturate, checked against naive references of the
x86 instructions (Intel SDM: PMADDUBSW saturates each pair sum to int16; PMADDWD does not), so
these tests catch the AVX2 bug on any CPU, VNNI or not."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.integer import cpu

INT16_MIN, INT16_MAX = -(1 << 15), (1 << 15) - 1


def vpmaddubsw_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [M, K] (u8) . b [K, N] (s8)`` as an AVX2 kernel without VNNI computes it: products of
    neighbouring k pairs summed into a saturating int16 (VPMADDUBSW), then widened and summed in
    int32 (VPMADDWD with ones, VPADDD)."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]   # [M, K/2, N]
    return np.clip(pairs, INT16_MIN, INT16_MAX).sum(axis=1)


def vpmaddwd_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The U8U8 kernel: both operands zero-extended to int16, pairs summed in int32 (VPMADDWD, which
    saturates only for -32768 * -32768 * 2), then int32 sums."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    assert a.min() >= 0 and b.min() >= 0 and a.max() < 256 and b.max() < 256
    pairs = a[:, :, None] * b[None, :, :]
    assert pairs.max() * 2 < 2 ** 31
    return pairs.sum(axis=1)


def _corners(lo: int, hi: int, n: int, rng) -> np.ndarray:
    return rng.choice(np.array([lo, hi, (lo + hi) // 2]), size=n)


def test_old_u8s8_format_saturates_and_u8u8_is_exact():
    # what lowbit wrote before: u8 activation codes (signed codes + 128) against int8 weight codes
    a = np.full((2, 64), 255, dtype=np.uint8)
    w = np.full((64, 3), -128, dtype=np.int8)
    w[:, 1], w[:, 2] = 127, 64
    exact = a.astype(np.int64) @ w.astype(np.int64)
    assert (vpmaddubsw_dot(a, w)[:, :2] != exact[:, :2]).all()          # the bug, on any CPU
    assert not cpu.pair_sum_fits_int16((0, 255), (-128, 127))
    # u8u8: weights + 128 with zero point 128: the same dot product, exactly
    wu = (w.astype(np.int16) + 128).astype(np.uint8)
    colsum = a.astype(np.int64).sum(axis=1, keepdims=True)
    assert (vpmaddwd_dot(a, wu) - 128 * colsum == exact).all()
    # 7-bit weights (|w| <= 64) against u8 activations fit int16 (what ONNX Runtime's reduce_range uses)
    assert cpu.pair_sum_fits_int16((0, 255), (-64, 64))
    assert (vpmaddubsw_dot(a, w[:, 2:]) == exact[:, 2:]).all()


@settings(max_examples=60, deadline=None)
@given(a_lo=st.integers(0, 255), a_span=st.integers(0, 255), b_lo=st.integers(-128, 127), b_span=st.integers(0, 255),
       seed=st.integers(0, 2 ** 31 - 1))
def test_pair_sum_check_agrees_with_vpmaddubsw(a_lo, a_span, b_lo, b_span, seed):
    """pair_sum_fits_int16 is exactly the condition under which VPMADDUBSW is exact for all operands in range."""
    a_hi, b_hi = min(255, a_lo + a_span), min(127, b_lo + b_span)
    rng = np.random.default_rng(seed)
    fits = cpu.pair_sum_fits_int16((a_lo, a_hi), (b_lo, b_hi))
    # operands at the corners of the ranges (where a pair sum is extreme) and inside them
    a = np.concatenate([_corners(a_lo, a_hi, 32, rng), rng.integers(a_lo, a_hi + 1, 32)]).reshape(2, 32)
    b = np.stack([np.full(32, b_lo), np.full(32, b_hi), rng.integers(b_lo, b_hi + 1, 32)], 1)
    exact = a.astype(np.int64) @ b.astype(np.int64)
    got = vpmaddubsw_dot(a.astype(np.uint8), b.astype(np.int8))
    if fits:
        assert (got == exact).all()
    else:   # the extreme operands overflow: the all-corner rows show it
        worst = [(x, y) for x in (a_lo, a_hi) for y in (b_lo, b_hi)
                 if not INT16_MIN <= 2 * x * y <= INT16_MAX]
        assert worst
        x, y = worst[0]
        aa = np.full((1, 8), x, dtype=np.uint8)
        bb = np.full((8, 1), y, dtype=np.int8)
        assert int(vpmaddubsw_dot(aa, bb)[0, 0]) != 8 * x * y


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), narrow=st.booleans(), w_lo=st.integers(-128, 127),
       w_span=st.integers(0, 255), force=st.sampled_from([None, "u8s8", "u8u8"]))
def test_portable_choice_cannot_overflow(bits, signed, narrow, w_lo, w_span, force):
    """The format picked for a file (portable) never lets VPMADDUBSW saturate, for every activation
    grid and weight range; forcing is obeyed."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(cpu.ENV, raising=False)
        _check_portable_choice(bits, signed, narrow, w_lo, w_span, force)


def _check_portable_choice(bits, signed, narrow, w_lo, w_span, force):
    from lowbit import QuantSpec

    spec = QuantSpec(bits, signed=signed, narrow_range=narrow and signed)
    a_range = cpu.u8_activation_range(spec.qmin, spec.qmax, spec.signed)
    w_range = (w_lo, min(127, w_lo + w_span))
    assert 0 <= a_range[0] <= a_range[1] <= 255
    fmt = cpu.choose_format(a_range, w_range, portable=True, int8_format=force)
    if force is not None:
        assert fmt == force
        return
    if fmt == "u8s8":
        a = np.array([[a_range[0], a_range[1]] * 4, [a_range[1]] * 8], dtype=np.uint8)
        b = np.array([[w_range[0], w_range[1]]] * 8, dtype=np.int8)
        assert (vpmaddubsw_dot(a, b) == a.astype(np.int64) @ b.astype(np.int64)).all()
    else:
        assert fmt == "u8u8" and not cpu.pair_sum_fits_int16(a_range, w_range)


def test_local_choice_follows_this_cpu(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    full = ((0, 255), (-127, 127))
    monkeypatch.setattr(cpu, "u8s8_exact_here", lambda: True)
    assert cpu.choose_format(*full, portable=False) == "u8s8"
    assert cpu.choose_format(*full, portable=True) == "u8u8"      # a file may run on AVX2
    monkeypatch.setattr(cpu, "u8s8_exact_here", lambda: False)
    assert cpu.choose_format(*full, portable=False) == "u8u8"
    assert cpu.choose_format((0, 255), (-64, 63), portable=False) == "u8s8"   # 7-bit weights: exact anyway


def test_environment_variable_forces_and_is_checked(monkeypatch):
    full = ((0, 255), (-127, 127))
    monkeypatch.setenv(cpu.ENV, "u8u8")
    assert cpu.choose_format((0, 255), (-3, 3), portable=True) == "u8u8"
    monkeypatch.setenv(cpu.ENV, "auto")
    assert cpu.choose_format(*full, portable=True) == "u8u8"
    monkeypatch.setenv(cpu.ENV, "s8s8")
    with pytest.raises(ValueError, match=cpu.ENV):
        cpu.choose_format(*full, portable=True)
    monkeypatch.delenv(cpu.ENV)
    with pytest.raises(ValueError, match="int8_format"):
        cpu.check_format("int8")


def test_forced_u8s8_on_a_saturating_cpu_says_so_once(monkeypatch, caplog):
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu, "u8s8_exact_here", lambda: False)
    monkeypatch.setattr(cpu, "_LOGGED", set())
    with caplog.at_level("WARNING", logger="lowbit.integer.cpu"):
        for _ in range(3):
            assert cpu.choose_format((0, 255), (-127, 127), portable=False, int8_format="u8s8") == "u8s8"
    warnings = [r for r in caplog.records if "x64quantprecision" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize("flags,machine,klass,saturates", [
    ("fpu sse2 avx avx2 fma", "x86_64", "avx2", True),                             # Haswell, Zen 1-3
    ("avx2 avx512f avx512bw avx512dq", "x86_64", "avx512", True),                 # Skylake-SP
    ("avx2 avx512f avx512bw avx512_vnni", "x86_64", "avx512_vnni", False),        # Cascade Lake, Zen 4
    ("avx2 avx_vnni", "x86_64", "avx_vnni", False),                               # Alder Lake
    ("avx2 avx512bw avx512_vnni amx_int8 amx_tile", "x86_64", "amx", False),     # Sapphire Rapids
    ("fp asimd asimddp", "aarch64", "other", False),
])
def test_cpu_classes_from_cpuinfo(tmp_path, monkeypatch, flags, machine, klass, saturates):
    f = tmp_path / "cpuinfo"
    key = "Features" if machine == "aarch64" else "flags"
    f.write_text(f"processor\t: 0\nmodel name\t: Test CPU\n{key}\t\t: {flags}\n\nprocessor\t: 1\n")
    model, read = cpu._read_cpuinfo(str(f))
    info = cpu.CpuInfo(model=model, machine=machine, torch_capability="AVX2",
                       flags=frozenset(x for x in read if x in cpu._ALL_FLAGS))
    assert info.int8_class == klass and info.u8s8_saturates == saturates
    assert "Test CPU" in info.describe()


def test_this_machine_probe_agrees_with_its_flags():
    pytest.importorskip("onnxruntime")
    info = cpu.cpu_info()
    assert info.torch_capability and info.machine
    probe = cpu.ort_u8s8_saturates()
    if info.known:
        assert probe == info.u8s8_saturates, info.describe()
    assert cpu.u8s8_exact_here() == (not probe)


def test_int_mm_that_saturates_falls_back_to_exact_and_says_so_once(monkeypatch, caplog):
    """lowbit's exact integer GEMM (to_integer, fast(backend="torch")) probes torch._int_mm once; a
    kernel that saturated like VPMADDUBSW would be replaced by the int32 matmul, with one warning."""
    import torch

    from lowbit.ops import integer_math

    def saturating_int_mm(a, b):
        return torch.from_numpy(vpmaddubsw_dot((a.numpy().astype(np.int16) + 128).astype(np.uint8), b.numpy())
                                - 128 * b.numpy().astype(np.int64).sum(0)).to(torch.int32)

    monkeypatch.setattr(torch, "_int_mm", saturating_int_mm)
    monkeypatch.setattr(integer_math, "_INT_MM", {})
    a = torch.full((3, 64), 127, dtype=torch.int8)
    b = torch.full((64, 2), -128, dtype=torch.int8)
    with caplog.at_level("WARNING", logger="lowbit.ops.integer_math"):
        for _ in range(2):
            got = integer_math.int_matmul(a, b)
            assert (got.to(torch.int64) == a.to(torch.int64) @ b.to(torch.int64)).all()
    assert len([r for r in caplog.records if "_int_mm" in r.getMessage()]) == 1
