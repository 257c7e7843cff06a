"""The ``mlpot`` command line. ``main()`` only dispatches; each command lives in its module."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _check(args: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(cutoff=args.cutoff, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="end-to-end check of the installation: builds the "
                       "neighbor-list op, reads data, compares neighbors with ASE")
    p.add_argument("--cutoff", type=float, default=6.0, help="Angstrom (default 6)")
    p.add_argument("--size", type=int, default=8, help="water box of size^3 molecules (default 8)")
    p.set_defaults(func=_check)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
