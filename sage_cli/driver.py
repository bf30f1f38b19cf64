"""shim: remove once nothing imports it. The Driver lives in sage_cli.execution.driver."""

from sage_cli.execution.driver import (
    Driver,
    ErrorMode,
    ErrorPolicy,
    Stats,
    convert_operator_error,
    write_failure,
)

__all__ = [
    "Driver",
    "ErrorMode",
    "ErrorPolicy",
    "Stats",
    "convert_operator_error",
    "write_failure",
]
