"""Strings from the command line to typed objects (argparse ``type=`` converters and friends)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {v}")
    return v


def name_list(text: str) -> list[str]:
    """``"a,b,c"`` -> ``["a", "b", "c"]``."""
    return [t.strip() for t in text.split(",") if t.strip()]


def is_factory(text: str) -> bool:
    return ":" in text


def import_factory(text: str, arg: str = "--model") -> Callable:
    """``"package.module:factory"`` -> the callable (the current directory is importable, as with
    ``python -m``). ``ValueError`` naming ``arg`` and the fix if it does not import."""
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{arg} {text!r}: write a user model as package.module:factory (e.g. mymodels:make_net)")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - an import can fail with any error inside the user's module
        raise ValueError(f"{arg} {text!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                         "check the name and run from the directory that holds it or add it to PYTHONPATH") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{arg} {text!r}: module {module_name!r} has no attribute {attr!r}; name the function "
                             "or class that builds the model")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{arg} {text!r}: {attr!r} is a {type(obj).__name__}, not a callable; name the function "
                         "or class that builds the model")
    return obj


def fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned text columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
