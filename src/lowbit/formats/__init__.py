"""Number formats: one object per format, looked up by the name in ``QuantSpec.format``.

See :mod:`lowbit.formats.base` for the protocol and ``docs/formats.md`` for the math of each
format. Adding a format: write one module here with a :class:`NumberFormat` subclass and add it
to ``_BUILTIN`` below.
"""
from __future__ import annotations

from .base import NotExpressibleError, NumberFormat, SignMagnitudeFormat, TableFormat
from .fp8_e4m3 import FP8E4M3
from .fp8_e5m2 import FP8E5M2
from .int import IntFormat
from .mxfp4 import MXFP4
from .mxfp8 import MXFP8
from .mxint8 import MXINT8
from .nf4 import NF4, NF4DoubleQuant
from .nvfp4 import NVFP4

__all__ = ["NumberFormat", "TableFormat", "SignMagnitudeFormat", "NotExpressibleError", "get", "register",
           "names", "FORMATS"]

FORMATS: dict[str, NumberFormat] = {}


def register(fmt: NumberFormat) -> NumberFormat:
    """Make ``fmt`` available as ``QuantSpec(format=fmt.name)``."""
    if not isinstance(fmt, NumberFormat) or not fmt.name:
        raise TypeError(f"fmt must be a named lowbit.formats.NumberFormat instance, got {fmt!r}")
    FORMATS[fmt.name] = fmt
    return fmt


def get(name: str) -> NumberFormat:
    """The format registered as ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"format must be one of {names()}, got {name!r}") from None


def names() -> list[str]:
    return list(FORMATS)


_BUILTIN = (IntFormat, FP8E4M3, FP8E5M2, NF4, NF4DoubleQuant, MXFP4, MXFP8, MXINT8, NVFP4)
for _cls in _BUILTIN:
    register(_cls())
