"""shim: remove once nothing imports it. Moved to sage_cli.observability.trace."""

import sys

from sage_cli.observability import trace as _moved
from sage_cli.observability.trace import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
