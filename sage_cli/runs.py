"""shim: remove once nothing imports it. Moved to sage_cli.run.directory."""

import sys

from sage_cli.run import directory as _moved
from sage_cli.run.directory import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
