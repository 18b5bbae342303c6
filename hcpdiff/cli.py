"""Shared command-line plumbing: `--cfg` + overrides parsing and one-line errors."""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence

from hcpdiff.errors import HcpError


def wants_debug(argv: Sequence[str]) -> bool:
    """True when the user asked for full tracebacks (`--debug` or HCP_DEBUG=1)."""
    return "--debug" in argv or os.environ.get("HCP_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> None:
    """Run `main(argv)`; a user error prints `error: ...` on one line and exits with status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = main(args)
    except HcpError as err:
        if wants_debug(args):
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def cfg_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A parser with `--cfg FILE`, `--debug` and free `key=value` overrides."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cfg", required=True, help="YAML config file")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("overrides", nargs="*", help="config overrides: a.b=value, +a.b=value, ~a.b")
    return parser
