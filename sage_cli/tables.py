"""shim: remove once nothing imports it. Moved to sage_cli.cli.tables."""

import sys

from sage_cli.cli import tables as _moved
from sage_cli.cli.tables import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
