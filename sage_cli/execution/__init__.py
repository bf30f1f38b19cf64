"""Execution: the one Driver (driver.py), the executors it hands batches to (executor.py:
inline; pool.py: `--workers`; ray.py: Ray actors) and the stage runtime beside every copy of
an operator (runtime.py). See docs/architecture.md."""
