"""shim: remove once nothing imports it. Moved to sage_cli.cli.command."""

import sys

from sage_cli.cli import command as _moved
from sage_cli.cli.command import *  # noqa: F403 - what type checkers see

sys.modules[__name__] = _moved  # what runs: the moved module itself
