"""shim: remove once nothing imports it. Moved to sage_cli.run.check."""

import sys

from sage_cli.run import check as _moved
from sage_cli.run.check import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
