"""shim: remove once nothing imports it. Moved to sage_cli.cli.io."""

import sys

from sage_cli.cli import io as _moved
from sage_cli.cli.io import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
