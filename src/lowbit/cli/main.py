"""The ``lowbit`` entry point: one sub-command per module of :mod:`lowbit.cli`.

A command module (``src/lowbit/cli/<name>.py``; names starting with ``_`` are helpers) defines::

    NAME = "train"                    # the sub-command
    HELP = "one line for lowbit --help"
    ORDER = 30                        # position in --help (demo 10, quantize 20, ...)
    def add_arguments(parser): ...    # argparse options; --json and --quiet are added for you
    def run(args) -> dict: ...        # call the library; return a JSON-able result
    def render(result) -> str: ...    # optional: the human-readable form (default: JSON)

and is found automatically: no shared file lists the commands, so commands added in parallel
do not conflict. ``run`` gets typed values from argparse (``type=`` converters in
:mod:`lowbit.cli._args`) and lets the library's ``ValueError``/``TypeError`` through: ``main``
prints them as one line ``lowbit <command>: error: ...`` on stderr and exits with status 2 (as
argparse does for a malformed command line). ``--json`` prints ``run``'s result as JSON on stdout;
progress (the library's logging) goes to stderr unless ``--quiet``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import pkgutil
import sys
from types import ModuleType

__all__ = ["main", "build_parser", "commands", "EXIT_BAD_INPUT"]

EXIT_BAD_INPUT = 2
_SKIP = {"main"}


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (tests swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_HANDLER = _StderrHandler()
_HANDLER.setFormatter(logging.Formatter("%(message)s"))


class _Broken:
    """Stands in for a command module that failed to import: the error shows when it is run."""

    def __init__(self, name: str, error: Exception) -> None:
        self.NAME, self.HELP, self.ORDER, self._error = name, f"(unavailable: {error})", 1000, error

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("rest", nargs=argparse.REMAINDER)

    def run(self, args: argparse.Namespace) -> dict:
        raise ImportError(f"lowbit {self.NAME} is unavailable: {self._error}")


def commands() -> list[ModuleType]:
    """The command modules of this package, in ``ORDER``."""
    from . import __path__ as pkg_path

    found = []
    for info in pkgutil.iter_modules(pkg_path):
        if info.name.startswith("_") or info.name in _SKIP:
            continue
        try:
            mod = importlib.import_module(f"{__package__}.{info.name}")
        except ImportError as e:
            found.append(_Broken(info.name, e))
            continue
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            found.append(mod)
    return sorted(found, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch models onto small integer grids.")
    sub = p.add_subparsers(dest="command", required=True, metavar="<command>")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    for mod in commands():
        doc = (getattr(mod, "__doc__", None) or mod.HELP).strip()
        sp = sub.add_parser(mod.NAME, help=mod.HELP, description=doc, parents=[common],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(sp)
        sp.set_defaults(_command=mod)
    return p


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("lowbit")
    if _HANDLER not in log.handlers:
        log.addHandler(_HANDLER)
    log.propagate = False
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run ``lowbit`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    mod = args._command
    _setup_logging(args.quiet)
    try:
        result = mod.run(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"lowbit {mod.NAME}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if result is None:  # nothing to report (e.g. a non-zero rank under torchrun)
        return 0
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        render = getattr(mod, "render", None)
        print(render(result) if render else json.dumps(result, indent=2))
    return 0
