"""mlpot's error kinds and the exit codes of every command (one table; README lists it).

==== ==========================================================================================
code meaning
==== ==========================================================================================
0    done
1    a bug in mlpot (a traceback is printed; please report it)
2    bad input: a file, a config value or an option that mlpot cannot use (one line says what
     to do)
3    a run stopped by a rule: the MD health check (temperature runaway, energy drift, an atom
     jumping) or an uncertainty threshold; the last good structure is saved
==== ==========================================================================================

Every expected error derives from :class:`UserError` (exit 2) or :class:`RunStopped` (exit 3);
``mlpot.cli.main`` prints their message on one line and returns their ``exit_code``. Any other
exception is a bug (exit 1), shown with its traceback.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


class UserError(Exception):
    """Bad input: the message says what is wrong and what to do. Exit code 2."""

    exit_code = EXIT_BAD_INPUT


class RunStopped(RuntimeError):
    """A run stopped on purpose by a rule (health check, uncertainty). Exit code 3."""

    exit_code = EXIT_STOPPED


def exit_code_of(err: BaseException) -> int:
    """The exit code for an exception reaching the command line (1 for anything unexpected)."""
    code = getattr(err, "exit_code", None)
    return code if isinstance(code, int) else EXIT_BUG
