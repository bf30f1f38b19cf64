"""shim: remove once nothing imports it. Moved to sage_cli.observability.dashboard."""

import sys

from sage_cli.observability import dashboard as _moved
from sage_cli.observability.dashboard import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
