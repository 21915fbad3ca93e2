"""What this CPU can multiply exactly in 8 bits, and which integer format lowbit writes for it.

ONNX Runtime's int8 GEMMs (MLAS, behind ``MatMulInteger``, ``MatMulIntegerToFloat``,
``QLinearMatMul``, ``QLinearConv`` and the fusions of QDQ graphs) multiply ``uint8`` activations
by ``int8`` weights ("U8S8"). Without VNNI, x86-64 does this with ``VPMADDUBSW``, which adds each
pair of neighbouring products into a *saturating* int16 (Intel SDM, PMADDUBSW)::

    VPMADDUBSW(a, b)[j] = sat16(a[2j] * b[2j] + a[2j+1] * b[2j+1])      a: u8, b: s8

so ``255 * 127 + 255 * 127 = 64770`` becomes ``32767`` and a dot product silently loses a multiple
of ``2^15`` -- on AVX2 and on AVX-512 without VNNI (Haswell .. Skylake-SP, AMD Zen 1-3).
``VPDPBUSD`` (AVX-512 VNNI, AVX-VNNI) and AMX accumulate the four products in int32 and are exact;
so are ONNX Runtime's U8U8 kernels (both operands widened to int16, ``VPMADDWD``: a pair sum of
``2 * 255 * 255`` fits int32) on every x86 class, and the ARM64 kernels.

Formats (:data:`FORMATS`), chosen per layer:

* ``"u8s8"``: weight codes as ``int8`` (zero point as calibrated). Fast; exact where the CPU has
  VNNI/AMX (or is not x86), and on every CPU when no pair of products can leave int16
  (:func:`pair_sum_fits_int16`: e.g. 7-bit weights ``|w| <= 64`` against ``u8`` activations).
* ``"u8u8"``: 8-bit signed weight codes written as ``uint8`` ``w + 128`` with zero point
  ``z_w + 128``: the same real weights (``(w + 128) - (z_w + 128) = w - z_w``, exact), and
  ONNX Runtime then runs its U8U8 kernels, exact on every CPU class.

:func:`choose_format` picks per layer: the forced format if one is given (argument, or the
environment variable :data:`ENV`), else ``"u8s8"`` where it cannot saturate (on the CPU the graph
runs on: ``portable=False``; or anywhere: ``portable=True``, the default for exported files, which
run on CPUs other than the exporter's), else ``"u8u8"``. A forced ``"u8s8"`` that can saturate on
this CPU is still exact when ONNX Runtime runs it through :func:`lowbit.export.session_options`:
those set ``session.x64quantprecision`` (ONNX Runtime rewrites int8 weights beyond 7 bits to U8U8
on CPUs whose U8S8 kernel overflows), and lowbit says so once (logging).

torch's ``_int_mm`` (oneDNN) is exact on every class (checked under an emulated Haswell CPU, and
probed at run time by :func:`lowbit.ops.integer_math.int_matmul`).
"""
from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass, field

import torch

__all__ = ["FORMATS", "ENV", "CpuInfo", "cpu_info", "u8s8_exact_here", "ort_u8s8_saturates", "pair_sum_range",
           "pair_sum_fits_int16", "choose_format", "check_format", "u8_activation_range"]

log = logging.getLogger(__name__)

FORMATS = ("u8s8", "u8u8")
ENV = "LOWBIT_INT8_FORMAT"
INT16 = (-(1 << 15), (1 << 15) - 1)
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_ALL_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8", "amx_bf16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU as far as int8 GEMMs care (see the module docstring)."""

    model: str
    machine: str                          # platform.machine(): x86_64, aarch64, ...
    torch_capability: str                 # torch.backends.cpu.get_cpu_capability(): AVX2, AVX512, ...
    flags: frozenset = field(default_factory=frozenset)   # the int8-relevant /proc/cpuinfo flags present
    known: bool = True                    # False when the flags could not be read

    @property
    def x86(self) -> bool:
        return self.machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")

    @property
    def vnni(self) -> bool:
        return any(f in self.flags for f in _VNNI_FLAGS)

    @property
    def int8_class(self) -> str:
        """``"amx"``, ``"avx512_vnni"``, ``"avx_vnni"``, ``"avx512"`` (no VNNI), ``"avx2"`` (no VNNI),
        ``"x86"`` (older or unknown x86) or ``"other"`` (not x86)."""
        if not self.x86:
            return "other"
        for name, flag in (("amx", "amx_int8"), ("avx512_vnni", "avx512_vnni"), ("avx_vnni", "avx_vnni"),
                           ("avx512", "avx512bw"), ("avx2", "avx2")):
            if flag in self.flags:
                return name
        return "x86"

    @property
    def u8s8_saturates(self) -> bool:
        """Whether ONNX Runtime's U8S8 kernels use saturating ``VPMADDUBSW`` here (x86 without
        VNNI/AMX; unknown flags count as saturating)."""
        return self.x86 and not self.vnni

    def describe(self) -> str:
        """One line: model, torch capability, int8 class, threads."""
        return (f"{self.model} ({self.machine}); torch cpu capability {self.torch_capability}; int8 class "
                f"{self.int8_class} ({'VPMADDUBSW saturates' if self.u8s8_saturates else 'exact u8s8'}); "
                f"torch threads {torch.get_num_threads()}")


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, set[str] | None]:
    model, flags = "", None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and flags is None:
                    flags = set(value.split())
                if model and flags is not None:
                    break
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's :class:`CpuInfo` (``/proc/cpuinfo`` on Linux; elsewhere the flags are unknown
    and an x86 CPU counts as saturating)."""
    model, flags = _read_cpuinfo()
    try:
        cap = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # torch < 2.3
        cap = "unknown"
    machine = platform.machine() or "unknown"
    return CpuInfo(model=model or platform.processor() or "unknown CPU", machine=machine, torch_capability=cap,
                   flags=frozenset(f for f in (flags or ()) if f in _ALL_FLAGS), known=flags is not None)


def pair_sum_range(a_range: tuple[int, int], b_range: tuple[int, int]) -> tuple[int, int]:
    """``(min, max)`` of ``a0 * b0 + a1 * b1`` over ``a0, a1`` in ``a_range`` and ``b0, b1`` in
    ``b_range`` (inclusive integer ranges): twice the extreme products of the corners."""
    corners = [a * b for a in a_range for b in b_range]
    return 2 * min(corners), 2 * max(corners)


def pair_sum_fits_int16(a_range: tuple[int, int], b_range: tuple[int, int]) -> bool:
    """Whether ``VPMADDUBSW`` is exact for every ``a`` (u8 activation codes) in ``a_range`` and ``b``
    (s8 weight codes) in ``b_range``: every pair sum lies in ``[-2^15, 2^15 - 1]``."""
    lo, hi = pair_sum_range(a_range, b_range)
    return INT16[0] <= lo and hi <= INT16[1]


def u8_activation_range(qmin: int, qmax: int, signed: bool) -> tuple[int, int]:
    """The uint8 codes the GEMM reads for an activation grid ``[qmin, qmax]`` (signed codes are
    shifted by +128 to uint8, zero point likewise)."""
    return (qmin + 128, qmax + 128) if signed else (qmin, qmax)


@functools.lru_cache(maxsize=1)
def ort_u8s8_saturates() -> bool | None:
    """Run ONNX Runtime's U8S8 ``MatMulInteger`` once on ``255 x -128`` (64 terms) in its default
    configuration: ``True`` if it saturates on this CPU, ``False`` if exact, ``None`` without onnxruntime."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    k = 64
    b = np.full((k, 2), -128, dtype=np.int8)
    b[:, 1] = 127
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [None, 2])],
                              [numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = session.run(None, {"A": np.full((4, k), 255, dtype=np.uint8)})[0]
    except Exception as e:  # noqa: BLE001 - a broken runtime: assume the worst
        log.info("lowbit: could not probe ONNX Runtime's int8 GEMM (%s); assuming it saturates", e)
        return True
    exact = bool((y[:, 0] == -128 * 255 * k).all() and (y[:, 1] == 127 * 255 * k).all())
    return not exact


def u8s8_exact_here() -> bool:
    """Whether ONNX Runtime's U8S8 GEMM is exact on this machine: the probe
    (:func:`ort_u8s8_saturates`) where onnxruntime is installed, else the CPU flags. A
    disagreement between the two is logged once (the probe wins)."""
    info = cpu_info()
    probe = ort_u8s8_saturates()
    if probe is None:
        return not info.u8s8_saturates
    if probe != info.u8s8_saturates and info.known:
        _log_once("disagree", logging.WARNING, "lowbit: ONNX Runtime's u8 x s8 GEMM %s on this CPU (%s) although its "
                  "flags say %s; lowbit follows the measurement", "saturates" if probe else "is exact",
                  info.int8_class, "it saturates" if info.u8s8_saturates else "it is exact")
    return not probe


_LOGGED: set[str] = set()


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.log(level, msg, *args)


def check_format(int8_format: str | None) -> str | None:
    """Validate a requested format (``None``: automatic; falls back to the :data:`ENV` variable)."""
    if int8_format is None:
        env = os.environ.get(ENV, "").strip().lower()
        if not env or env == "auto":
            return None
        if env not in FORMATS:
            raise ValueError(f"environment variable {ENV}={env!r}: use one of {FORMATS} or 'auto'")
        return env
    if int8_format not in FORMATS:
        raise ValueError(f"int8_format must be one of {FORMATS} or None (automatic), got {int8_format!r}")
    return int8_format


def choose_format(a_range: tuple[int, int], w_range: tuple[int, int], *, portable: bool,
                  int8_format: str | None = None, layer: str = "") -> str:
    """The format of one layer with uint8 activation codes in ``a_range`` and int8 weight codes in
    ``w_range`` (see the module docstring). ``portable``: the graph may run on any CPU (an exported
    file), else on this one."""
    forced = check_format(int8_format)
    safe = pair_sum_fits_int16(a_range, w_range)
    if forced == "u8s8" and not safe:
        if portable:
            _log_once("forced-file", logging.INFO, "lowbit: int8_format='u8s8': layers with 8-bit weights (e.g. %r) "
                      "are exact only on CPUs with VNNI/AMX (or in ONNX Runtime with session.x64quantprecision=1)",
                      layer)
        elif not u8s8_exact_here():
            _log_once("forced-here", logging.WARNING, "lowbit: int8_format='u8s8' saturates in ONNX Runtime on this "
                      "CPU (%s); lowbit's sessions set session.x64quantprecision=1, so ONNX Runtime runs "
                      "these layers as U8U8 (exact)", cpu_info().int8_class)
    if forced is not None:
        return forced
    if safe or (not portable and u8s8_exact_here()):
        return "u8s8"
    return "u8u8"
