"""shim: remove once nothing imports it. Moved to sage_cli.run.runner."""

import sys

from sage_cli.run import runner as _moved
from sage_cli.run.runner import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
