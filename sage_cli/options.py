"""shim: remove once nothing imports it. Moved to sage_cli.cli.options."""

import sys

from sage_cli.cli import options as _moved
from sage_cli.cli.options import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
