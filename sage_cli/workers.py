"""shim: remove once nothing imports it. `--workers` lives in sage_cli.execution.pool."""

from sage_cli.execution.pool import ProcessPoolExecutor, WorkerPool, worker_kwargs
from sage_cli.execution.runtime import RemoteError, portable_error

__all__ = ["ProcessPoolExecutor", "RemoteError", "WorkerPool", "portable_error", "worker_kwargs"]
