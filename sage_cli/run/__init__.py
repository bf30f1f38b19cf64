"""`sage run`: the pipeline script (script.py), the supervisor and its parts, the run directory
(directory.py), --check, --watch, the Ray run (runner.py)."""
