"""The shell around sage's operators: CLI assembly, NDJSON I/O, the driver, exit codes."""

__version__ = "0.1.0"
