"""The number-format protocol: how a tensor, divided by its scale, becomes codes and back.

A :class:`NumberFormat` is one object per format (``"int"``, ``"fp8_e4m3"``, ``"nf4"``, ...),
registered by name in :mod:`lowbit.formats`. With ``v = x / scale`` (the scale broadcast as the
spec's granularity says, see :mod:`lowbit.ops.params`)::

    codes = encode(v)            # nearest representable value, saturating at +-max_value
    x^    = decode(codes) * scale

Every format except ``"int"`` is a *value table*: a finite set of representable element values
(:meth:`values`), one code each. :class:`TableFormat` implements encode/decode for any table:
round to the nearest value (ties to the even code, IEEE roundTiesToEven for the float formats;
stochastic rounding picks a neighbour with probability proportional to its proximity), saturate
beyond the largest magnitude. ``"int"`` (today's affine grids, with a zero point) keeps the fused
kernels of :mod:`lowbit.ops`; its format object says so with ``integer_grid = True``.

Formats take the :class:`~lowbit.QuantSpec` as a plain argument (this package sits beside
``spec`` in the layer picture and does not import it).
"""
from __future__ import annotations

import math

import torch

__all__ = ["NumberFormat", "TableFormat", "SignMagnitudeFormat", "NotExpressibleError"]


class NotExpressibleError(ValueError):
    """The format has no representation in the requested target (e.g. NF4 in ONNX)."""


class NumberFormat:
    """Base class; see the module docstring. Subclasses set the class attributes below."""

    #: registry name, the value of ``QuantSpec.format``
    name: str = ""
    #: bits per element code (what packing uses: 4-bit codes are stored two per byte)
    bits: int = 8
    #: integer grid with a zero point: :mod:`lowbit.ops` runs its fused integer kernels
    integer_grid: bool = False
    #: PerGroup size the format requires (OCP MX: 32, NVFP4: 16); None = any granularity
    block_size: int | None = None
    #: PerGroup size used when the spec leaves the granularity at its default (NF4: 64)
    default_block: int | None = None
    #: whether codes are two's complement (sign-extended when unpacked)
    code_signed: bool = False
    #: the format can hold NaN (quantize keeps it); otherwise NaN input is an error
    has_nan: bool = False
    #: bits of each stored scale, for the bits-per-weight account (float32 by default)
    scale_bits: int = 32
    #: the scales of a tensor depend on each other (double quantization, a tensor-level scale):
    #: they are chosen for the whole tensor at once
    coupled_scales: bool = False
    #: reference, cited in docs/formats.md
    reference: str = ""

    # ------------------------------------------------------------------ spec-dependent facts
    def check_spec(self, spec) -> None:
        """Raise ``ValueError`` naming the argument if ``spec`` does not fit this format."""
        if not spec.symmetric:
            raise ValueError(f"QuantSpec: format={self.name!r} is symmetric (no zero point); "
                             "leave symmetric=True")
        if spec.narrow_range:
            raise ValueError(f"QuantSpec: narrow_range applies to integer grids only, not format={self.name!r}")

    def code_range(self, spec) -> tuple[int, int]:
        """Smallest and largest code (as integers of :meth:`storage_dtype`)."""
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.code_signed else (0, (1 << self.bits) - 1)

    def signed_codes(self, spec) -> bool:
        """Whether unpacked codes are two's complement (sign-extended when unpacked)."""
        return self.code_signed

    def zero_point_range(self, spec) -> tuple[int, int]:
        """Allowed zero points: only 0 for formats without one."""
        return 0, 0

    def symmetric_zero_point(self, spec) -> int:
        return 0

    def steps_in_range(self, spec) -> float:
        """The real range a scale covers, in units of the scale (``[-max_value, max_value]``:
        ``max_value``; an integer grid: ``qmax - z0``, or ``qmax - qmin`` if affine)."""
        return self.max_value

    def storage_dtype(self, spec) -> torch.dtype:
        """Dtype of unpacked codes."""
        return torch.int8 if self.code_signed else torch.uint8

    def bits_per_weight(self, spec, numel: int | None = None) -> float:
        """Element bits plus scale overhead (scale bits / elements per scale)."""
        per = _elements_per_scale(spec, numel)
        return self.bits + (self.scale_bits / per if per else 0.0)

    def __repr__(self) -> str:
        return f"<lowbit number format {self.name!r}>"

    # ------------------------------------------------------------------ values and rounding
    @property
    def max_value(self) -> float:
        """Largest finite magnitude (at scale 1): what saturates."""
        raise NotImplementedError

    def values(self, spec=None) -> torch.Tensor:
        """Sorted distinct representable element values (float64, at scale 1)."""
        raise NotImplementedError

    def encode(self, v: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Codes (int32) of ``v = x / scale``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Element values of ``codes`` (``x^ / scale``)."""
        raise NotImplementedError

    def round(self, v: torch.Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> torch.Tensor:
        """``decode(encode(v))`` in ``v``'s dtype: the representable value ``v`` maps to."""
        return self.decode(self.encode(v, rounding, generator), v.dtype)

    def saturated(self, v: torch.Tensor) -> torch.Tensor:
        """Where ``v`` lies beyond the largest magnitude (the clipping part of the error)."""
        return v.abs() > self.max_value

    # ------------------------------------------------------------------ scales
    def scale_for_range(self, r: torch.Tensor) -> torch.Tensor:
        """Scale per row that maps the real range ``[-r, r]`` onto the format (absmax rule:
        ``r / max_value``; 1 for an empty row)."""
        s = (r / self.max_value).clamp_min(torch.finfo(r.dtype).tiny)
        return torch.where(r > 0, s, torch.ones_like(s))

    def finish_scales(self, scale: torch.Tensor, spec) -> torch.Tensor:
        """Hook for formats whose scales are themselves quantized (double quantization,
        FP8 block scales): ``scale`` holds every scale of one tensor, shaped as the spec says."""
        return scale

    # ------------------------------------------------------------------ storage and export
    def checkpoint_entry(self, spec) -> dict:
        """What a checkpoint records about the format (besides the spec)."""
        return {"format": self.name, "bits": self.bits, "code_dtype": str(self.storage_dtype(spec)).split(".")[-1]}

    def onnx_types(self, spec):
        """``(element type, zero-point dtype)`` for ONNX QuantizeLinear/DequantizeLinear."""
        raise NotExpressibleError(
            f"format {self.name!r} is not expressible in ONNX (QuantizeLinear/DequantizeLinear have no "
            f"{self.name} type); export an 'int' or 'fp8_e4m3'/'fp8_e5m2' spec, or keep this model in PyTorch")


def _elements_per_scale(spec, numel: int | None) -> int | None:
    g = spec.granularity
    size = getattr(g, "size", None)
    if size is not None:
        return size
    if numel is None:
        return None
    return numel


def _check_rounding(rounding: str) -> None:
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")


class TableFormat(NumberFormat):
    """A format given by the value of each code: ``decode_table()[code]`` (NaN marks a NaN code).

    ``encode`` rounds to the nearest finite value; a tie goes to the even code (for the float
    formats this is IEEE 754 roundTiesToEven, the rule of the OCP specs); beyond the largest
    magnitude it saturates. Codes are indices into the table (two's complement for
    ``code_signed`` formats, see :meth:`_index`).
    """

    def decode_table(self) -> torch.Tensor:
        """float64 tensor of ``2**bits`` values, indexed by the unsigned code."""
        raise NotImplementedError

    # cached per format object
    def _tables(self, device: torch.device):
        cache = self.__dict__.setdefault("_cache", {})
        key = str(device)
        if key not in cache:
            table = self.decode_table().to(torch.float64)
            codes = torch.arange(table.numel(), dtype=torch.int64)
            finite = torch.isfinite(table)
            vals, codes = table[finite], codes[finite]
            # one code per value (the first, i.e. +0 before -0), sorted by value
            order = torch.argsort(vals, stable=True)
            vals, codes = vals[order], codes[order]
            keep = torch.ones_like(vals, dtype=torch.bool)
            keep[1:] = vals[1:] != vals[:-1]
            vals, codes = vals[keep], codes[keep]
            mids = (vals[1:] + vals[:-1]) / 2
            cache[key] = (table.to(device), vals.to(device), codes.to(device), mids.to(device))
        return cache[key]

    @property
    def max_value(self) -> float:
        t = self.decode_table()
        return float(t[torch.isfinite(t)].abs().max())

    def values(self, spec=None) -> torch.Tensor:
        return self._tables(torch.device("cpu"))[1].clone()

    def _index(self, codes: torch.Tensor) -> torch.Tensor:
        c = codes.to(torch.int64)
        return c & ((1 << self.bits) - 1) if self.code_signed else c

    def _code(self, index: torch.Tensor) -> torch.Tensor:
        if self.code_signed:
            half = 1 << (self.bits - 1)
            return torch.where(index >= half, index - (1 << self.bits), index)
        return index

    def _nearest(self, m: torch.Tensor, vals, codes, mids, rounding, generator) -> torch.Tensor:
        """Index into ``vals`` of the value ``m`` (float64, finite) rounds to."""
        hi = torch.searchsorted(vals, m).clamp_(1, vals.numel() - 1)
        lo = hi - 1
        v_lo, v_hi = vals[lo], vals[hi]
        if rounding == "nearest":
            mid = mids[lo]
            even_hi = (codes[hi] & 1) == 0
            up = (m > mid) | ((m == mid) & even_hi)
        else:
            u = torch.rand(m.shape, generator=generator, dtype=torch.float64, device=m.device)
            up = u < (m - v_lo) / (v_hi - v_lo)
        up = torch.where(m >= v_hi, True, torch.where(m <= v_lo, False, up))  # saturation, exact hits
        return torch.where(up, hi, lo)

    def encode(self, v: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> torch.Tensor:
        _check_rounding(rounding)
        table, vals, codes, mids = self._tables(v.device)
        m = v.detach().to(torch.float64)
        nan = torch.isnan(m)
        m = torch.where(nan, torch.zeros((), dtype=m.dtype, device=m.device), m)
        idx = codes[self._nearest(m, vals, codes, mids, rounding, generator)]
        if self.has_nan:
            idx = torch.where(nan, self.nan_code(), idx)
        return self._code(idx).to(torch.int32)

    def nan_code(self) -> int:
        raise ValueError(f"format {self.name!r} has no NaN")

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        table = self._tables(codes.device)[0]
        return table[self._index(codes)].to(dtype)


class SignMagnitudeFormat(TableFormat):
    """A table format whose top code bit is the sign (the minifloats): ``encode`` rounds
    ``|v|`` on the magnitude table and sets the sign bit of ``v`` (so ``-0.0`` and negative
    values that round to zero get the negative-zero code, as IEEE casts do)."""

    def _mag_tables(self, device):
        cache = self.__dict__.setdefault("_mcache", {})
        key = str(device)
        if key not in cache:
            half = 1 << (self.bits - 1)
            mags = self.decode_table()[:half].to(torch.float64)
            finite = torch.isfinite(mags)
            codes = torch.arange(half, dtype=torch.int64)[finite]
            mags = mags[finite]
            cache[key] = (mags.to(device), codes.to(device), ((mags[1:] + mags[:-1]) / 2).to(device))
        return cache[key]

    def encode(self, v: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> torch.Tensor:
        _check_rounding(rounding)
        mags, codes, mids = self._mag_tables(v.device)
        m = v.detach().to(torch.float64)
        nan = torch.isnan(m)
        neg = torch.signbit(m)
        a = torch.where(nan, torch.zeros((), dtype=m.dtype, device=m.device), m.abs())
        mag = codes[self._nearest(a, mags, codes, mids, rounding, generator)]
        if self.has_nan:
            mag = torch.where(nan, self.nan_code(), mag)   # NaN keeps its sign bit, as IEEE casts do
        out = torch.where(neg, mag | (1 << (self.bits - 1)), mag)
        return out.to(torch.int32)


def minifloat_table(exp_bits: int, man_bits: int, bias: int, finite_top: bool, nan_codes=()) -> torch.Tensor:
    """Values of all ``2^(1+e+m)`` codes of a sign/exponent/mantissa minifloat (float64).

    ``finite_top``: the all-ones exponent holds normal numbers (E4M3FN, E2M1) rather than
    infinities/NaN (IEEE-like E5M2, where it holds inf and NaN). ``nan_codes``: magnitude codes
    that are NaN (E4M3FN: ``0x7F``). Value of a code: subnormal ``(-1)^s 2^(1-bias) (m / 2^M)``,
    normal ``(-1)^s 2^(e-bias) (1 + m / 2^M)`` (OCP 8-bit FP spec, section 5; IEEE 754).
    """
    n = 1 + exp_bits + man_bits
    out = torch.empty(1 << n, dtype=torch.float64)
    top = (1 << exp_bits) - 1
    for code in range(1 << n):
        s = code >> (n - 1)
        e = (code >> man_bits) & top
        m = code & ((1 << man_bits) - 1)
        mag_code = code & ((1 << (n - 1)) - 1)
        if mag_code in nan_codes:
            val = math.nan
        elif e == top and not finite_top:
            val = math.inf if m == 0 else math.nan
        elif e == 0:
            val = 2.0 ** (1 - bias) * (m / (1 << man_bits))
        else:
            val = 2.0 ** (e - bias) * (1 + m / (1 << man_bits))
        out[code] = -val if s else val
    return out
