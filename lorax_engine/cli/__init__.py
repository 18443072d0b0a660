"""Command line: ``python -m lorax_engine <command> ...``.

Each command lives in its own module with ``add_arguments(subparsers)``, which adds its sub-parser and sets
``run=<function(args) -> exit code>``; registering a command is one entry in ``COMMAND_MODULES``.
Errors the user can fix (:class:`LoraXError`) print one line ``error: <message>`` and exit with status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .. import __version__
from ..errors import LoraXError

COMMAND_MODULES = (
    "lorax_engine.reports.inspect",
    "lorax_engine.cli.transfer",
    "lorax_engine.cli.cache",
)

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorax_engine",
                                     description="LoRA-X: carry SD1.5 LoRAs over to SDXL without training.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_arguments(subparsers)
    return parser


def main(argv=None) -> int:
    for stream in (sys.stdout, sys.stderr):
        # file names that are not UTF-8 reach messages as lone surrogates: print them escaped, never crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LoraXError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:   # a bug: one line for users, the traceback on request
        if os.environ.get("LORAX_DEBUG"):
            raise
        print(f"error: unexpected {type(err).__name__}: {err} (set LORAX_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
