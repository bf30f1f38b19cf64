"""The `_sage` trace envelope: a record's own account of the stages it went through.

`SAGE_ENVELOPE=1` in a stage's environment (export it once for a whole pipe, or set it for
`sage run`) makes every record the stage writes carry

    "_sage": {"run": "<run id>", "stages": [{"stage": "embed", "ms": 4.1}, ...]}

one entry appended per stage, in pipeline order, with the record's share of its batch's
processing time. The run id is the one the record arrived with; else `sage run`'s (SAGE_RUN_ID);
else one made when the stage started, so the first stage of a plain bash pipe names the run for
the rest. The envelope is in-band (it travels with the record through files, pipes and other
tools), unlike `sage run`'s out-of-band trace files, so it is opt-in: it costs a dict per record
per stage. `_error` records pass through untouched, as always.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from sage_cli.run.env import StageEnv


def envelope_from_env(stage: str, env: StageEnv | None = None) -> Envelope | None:
    """The envelope the environment asks for, or None (the default: records stay as they are)."""
    env = env or StageEnv.read()
    if not env.envelope:
        return None
    return Envelope(env.trace_stage or stage, env.run_id or new_run_id())


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


class Envelope:
    def __init__(self, stage: str, run_id: str) -> None:
        self.stage = stage
        self.run_id = run_id

    def stamp(self, out: list[dict[str, Any]], seconds: float, records_in: int) -> None:
        """Append this stage to the envelope of every record in `out` (in place)."""
        if not out:
            return
        ms = round(seconds * 1000.0 / max(1, records_in), 3)
        for record in out:
            if "_error" in record:
                continue
            previous = record.get("_sage")
            if isinstance(previous, dict):
                stages = previous.get("stages")
                stages = [*stages] if isinstance(stages, list) else []
                run = previous.get("run") or self.run_id
            else:
                stages, run = [], self.run_id
            stages.append({"stage": self.stage, "ms": ms})
            record["_sage"] = {"run": run, "stages": stages}
