"""shim: remove once nothing imports it. Moved to sage_cli.run.supervisor."""

import sys

from sage_cli.run import supervisor as _moved
from sage_cli.run.supervisor import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
