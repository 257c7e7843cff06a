"""``python -m mlpot ...`` is the ``mlpot`` command (so ``torchrun -m mlpot train CONFIG`` works)."""
import sys

from .cli import main

sys.exit(main())
