"""``lowbit <command>``: parses strings into typed objects and calls the library; nothing else.

Each command is one module of this package (``demo.py``, ``quantize.py``, ...), found by
:func:`lowbit.cli.main.commands`; adding a command is adding a file (see :mod:`lowbit.cli.main`).
"""
from .main import build_parser, commands, main

__all__ = ["main", "build_parser", "commands"]
