"""The ``mlpot`` command line. ``main()`` only dispatches; each command lives in its module."""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import List, Optional


def _check(args: argparse.Namespace) -> int:
    from .check import run_check

    return run_check(cutoff=args.cutoff, size=args.size)


def _train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    cfg = load_config(args.config)
    if args.out_dir:
        cfg.training.out_dir = args.out_dir
    results = train(cfg, resume=args.resume)
    if not results:  # a data-parallel process other than rank 0: rank 0 reports
        return 0
    from .train.evaluate import format_table

    for split in ("validation", "test"):
        if split in results:
            print(f"\n{split}:\n{format_table(results[split])}")
    print(f"\noutputs in {cfg.training.out_dir}/ (best.pt, last.pt, log.csv, metrics.json, "
          "parity.png, learning_curve.png)")
    return 0


def _test(args: argparse.Namespace) -> int:
    from .train.evaluate import evaluate_file, format_table

    kwargs = {}
    for key in ("energy_key", "forces_key"):
        if getattr(args, key):
            kwargs[key] = getattr(args, key)
    metrics = evaluate_file(args.model, args.data, out_dir=args.out, device=args.device, **kwargs)
    print(json.dumps(metrics, indent=1) if args.json else format_table(metrics))
    if args.out:
        print(f"wrote {args.out}/test_metrics.json and {args.out}/parity.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlpot", description="Machine-learned interatomic "
                                     "potentials: train, test, export, run MD.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of expected errors too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="end-to-end check of the installation")
    p.add_argument("--cutoff", type=float, default=6.0, help="Angstrom (default 6)")
    p.add_argument("--size", type=int, default=8, help="water box of size^3 molecules (default 8)")
    p.set_defaults(func=_check)

    p = sub.add_parser("train", help="train a potential from a YAML config")
    p.add_argument("config", help="YAML file (see examples/train_config.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/last.pt")
    p.add_argument("--out-dir", help="override training.out_dir")
    p.set_defaults(func=_train)

    p = sub.add_parser("test", help="metrics and parity plots of a model on labelled data")
    p.add_argument("model", help="training checkpoint (best.pt) or exported model file")
    p.add_argument("--data", required=True, help="labelled data (extxyz, any ASE format, DeePMD)")
    p.add_argument("--out", help="folder for test_metrics.json and parity.png")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--device", default="cpu")
    p.add_argument("--energy-key", dest="energy_key")
    p.add_argument("--forces-key", dest="forces_key")
    p.set_defaults(func=_test)

    from .doctor import add_doctor_parser
    from .export import add_export_parser

    from integrators.cli import add_md_parser

    from .demo import add_demo_parser

    add_demo_parser(sub)
    add_export_parser(sub)
    add_doctor_parser(sub)
    add_md_parser(sub)
    from .label import add_label_parser

    add_label_parser(sub)
    from .learn import add_learn_parser

    add_learn_parser(sub)
    from .distill import add_distill_parser

    add_distill_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; its exit code follows the table in ``mlpot.errors`` (0 done, 1 a bug,
    2 bad input, 3 a run stopped by a rule). Expected errors print one line; ``--debug`` shows
    their traceback too. Anything else is a bug and prints its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted before or after the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    from .data import DataError
    from .errors import EXIT_BAD_INPUT, exit_code_of
    from .train import ConfigError

    from .threads import apply_default_threads, restore_threads

    previous = apply_default_threads(args.command)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"mlpot {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - sorted into expected errors and bugs below
        expected = (DataError, ConfigError, FileNotFoundError, IsADirectoryError,
                    PermissionError)
        code = EXIT_BAD_INPUT if isinstance(err, expected) else exit_code_of(err)
        if code == 1 or args.debug:
            traceback.print_exc()
        if code == 1:
            print(f"mlpot {args.command}: this is a bug in mlpot, please report it with the "
                  "traceback above", file=sys.stderr)
        else:
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"mlpot {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        restore_threads(previous)


if __name__ == "__main__":
    sys.exit(main())
