"""What `sage run` tells the stages it starts, through their environment: the one place these
variable names are spelled. The supervisor writes a StageEnv into a stage's environment
(`apply`); the stage reads it back (`StageEnv.read()`) when it sets up its Driver. A stage run
by hand reads an empty StageEnv, except for what the user exported (SAGE_ENVELOPE=1 for a
whole pipe, SAGE_THREADS)."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

TRACE_DIR = "SAGE_TRACE_DIR"  # where the stage appends its trace (a run's stages/)
TRACE_STAGE = "SAGE_TRACE_STAGE"  # its name in the run: 2-embed
TRACE_IDS = "SAGE_TRACE_IDS"  # "0": batches without record ids (--trace batches)
#: the traced sage stage whose stdout is this stage's stdin (its trace names the records)
TRACE_FED_BY = "SAGE_TRACE_FED_BY"
RUN_ID = "SAGE_RUN_ID"  # the run's id, for the `_sage` envelope
ENVELOPE = "SAGE_ENVELOPE"  # "1": stamp `_sage` on every record
RUN_FLUSH = "SAGE_RUN_FLUSH"  # "1": every batch leaves at once (--retries isolating a crash)
RUN_BATCH_SIZE = "SAGE_RUN_BATCH_SIZE"  # batches of this size (1 while isolating a crash)
THREADS = "SAGE_THREADS"  # a model stage's share of the cores
#: a run bash runs (any script): the run directory; a stage names itself (sage_cli.run.registry)
RUN_DIR = "SAGE_RUN_DIR"
RUN_PID = "SAGE_RUN_PID"  # ... and `sage run`'s pid, above which no stage looks
RUN_LIFELINE = "SAGE_RUN_LIFELINE"  # "FD:INODE": the pipe that closes when `sage run` dies
RUN_PLACE = "SAGE_RUN_PLACE"  # a keeper's worker: its keeper's place "position,pipe"
#: `sage run --engine ray` under bash: the cluster a stage runs its batches on, and --replicas
RAY_ADDRESS = "SAGE_RAY_ADDRESS"
RAY_REPLICAS = "SAGE_RAY_REPLICAS"  # "embed=2,map=3"
#: "0": `sage run` starts each sage stage of a parsed pipeline as a new interpreter, not as a
#: fork of itself (sage_cli.run.fork)
RUN_FORK = "SAGE_RUN_FORK"
#: restart a stage that dies, up to N times (sage_cli.run.keeper): the stage becomes a keeper
RUN_RETRIES = "SAGE_RUN_RETRIES"
RUN_BACKOFF = "SAGE_RUN_BACKOFF"  # seconds before the first restart (doubles each time)
#: "1": this process is a keeper's worker: it writes commit markers (sage_cli.run.keeper)
RUN_WORKER = "SAGE_RUN_WORKER"
#: a restarted worker of a stateful operator: replay input lines 1..N without writing outputs
RUN_REPLAY = "SAGE_RUN_REPLAY"
#: a keeper's worker: "ATTEMPT,AFTER,FROM,FORWARDED": its attempt (1 first), the status the one
#: before it died with, the input lines and output lines the keeper had committed when it started;
#: written in its trace's start event, so the run's summary counts a stage's restarts exactly
RUN_ATTEMPT = "SAGE_RUN_ATTEMPT"
#: a keeper's worker: the size its `--errors FILE` had when the keeper's first worker to open it
#: did (what came after is this keeper's: a restarted worker writes no entry twice)
RUN_ERRORS_FROM = "SAGE_RUN_ERRORS_FROM"


def keeper_attempt() -> tuple[int, int, int, int] | None:
    """In a keeper's worker: SAGE_RUN_ATTEMPT as numbers (its attempt, 1 first; the status the
    one before it died with; the input lines committed before it, which it is not fed; the
    output lines forwarded before it), else None."""
    try:
        number, after, first, forwarded = (int(x) for x in os.environ[RUN_ATTEMPT].split(","))
    except (KeyError, ValueError):
        return None
    return number, after, first, forwarded


@dataclass(frozen=True)
class StageEnv:
    trace_dir: str | None = None
    trace_stage: str | None = None
    trace_ids: bool = True
    trace_fed_by: str | None = None
    run_id: str | None = None
    envelope: bool = False
    flush_every_batch: bool = False
    batch_size: int | None = None
    threads: int | None = None
    ray_address: str | None = None
    ray_replicas: str | None = None
    run_dir: str | None = None

    @classmethod
    def read(cls, environ: Mapping[str, str] | None = None) -> StageEnv:
        env = os.environ if environ is None else environ
        size = env.get(RUN_BATCH_SIZE, "")
        threads = env.get(THREADS, "")
        return cls(
            trace_dir=env.get(TRACE_DIR) or None,
            trace_stage=env.get(TRACE_STAGE) or None,
            trace_ids=env.get(TRACE_IDS, "1") != "0",
            trace_fed_by=env.get(TRACE_FED_BY) or None,
            run_id=env.get(RUN_ID) or None,
            envelope=env.get(ENVELOPE, "") not in ("", "0"),
            flush_every_batch=env.get(RUN_FLUSH) == "1",
            batch_size=int(size) if size.isdigit() and int(size) > 0 else None,
            threads=int(threads) if threads.isdigit() and int(threads) > 0 else None,
            ray_address=env.get(RAY_ADDRESS) or None,
            ray_replicas=env.get(RAY_REPLICAS) or None,
            run_dir=env.get(RUN_DIR) or None,
        )

    def apply(self, env: MutableMapping[str, str]) -> None:
        """Write this into `env`: a field left at its default removes its variable (except
        `envelope` and `threads`, which the user may have set for the whole run)."""
        values = {
            TRACE_DIR: self.trace_dir,
            TRACE_STAGE: self.trace_stage,
            TRACE_IDS: None if self.trace_ids else "0",
            TRACE_FED_BY: self.trace_fed_by,
            RUN_ID: self.run_id,
            RUN_FLUSH: "1" if self.flush_every_batch else None,
            RUN_BATCH_SIZE: str(self.batch_size) if self.batch_size else None,
        }
        if self.envelope:
            values[ENVELOPE] = "1"
        if self.threads:
            values[THREADS] = str(self.threads)
        if self.run_dir:
            values[RUN_DIR] = self.run_dir
        if self.ray_address:
            values[RAY_ADDRESS] = self.ray_address
            values[RAY_REPLICAS] = self.ray_replicas
        for name, value in values.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value


def forwarded(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The SAGE_* settings a stage running elsewhere (a Ray actor) needs: every one but the
    trace directory (the Driver, not the actor, writes the trace)."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith("SAGE_") and k != TRACE_DIR}
