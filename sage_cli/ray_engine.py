"""shim: remove once nothing imports it. The Ray engine lives in sage_cli.execution.ray."""

import sys

from sage_cli.execution.plan import parse_replicas, plan_stages
from sage_cli.execution.ray import RayExecutor, StageActor, connect, main, run_ray_pipeline

__all__ = [
    "RayExecutor",
    "StageActor",
    "connect",
    "main",
    "parse_replicas",
    "plan_stages",
    "run_ray_pipeline",
]

if __name__ == "__main__":
    sys.exit(main())
