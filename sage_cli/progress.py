"""shim: remove once nothing imports it. Moved to sage_cli.observability.progress."""

import sys

from sage_cli.observability import progress as _moved
from sage_cli.observability.progress import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
