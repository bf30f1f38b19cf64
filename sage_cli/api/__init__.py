"""sage from Python: the seed's quick start on sage's operators.

    from sage_cli.api import LocalEnvironment

    env = LocalEnvironment("rag_pipeline")
    (env.from_source("questions.ndjson")
        .map("retrieve", index="idx/", top_k=5)
        .map("prompt", template="qa")
        .map("generate", max_tokens=64)
        .sink(print))
    env.submit()

A stage is a sage verb with keyword options named after its long flags, a Python callable, or
an operator instance. `env.to_script()` and `env.to_yaml()` give the same pipeline as a bash
script and as a YAML file for `sage run`. See docs/python.md.
"""

from sage_cli.api.env import LocalEnvironment
from sage_cli.api.runtime import PipelineError, StageCounts
from sage_cli.api.stream import DataStream

__all__ = ["DataStream", "LocalEnvironment", "PipelineError", "StageCounts"]
