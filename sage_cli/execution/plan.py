"""Planning a pipeline for the Ray engine, without importing Ray: which stages it accepts, how
many actors each gets. `sage run --check --engine ray` calls exactly this, so --check predicts
what the engine accepts (issue 11)."""

from __future__ import annotations

from dataclasses import dataclass

from sage_cli.cli.command import refuse_opted_out
from sage_cli.errors import UsageError
from sage_cli.execution.driver import convert_operator_error
from sage_cli.operators.base import Operator
from sage_cli.verbs import StageCall, parse_stage, stage_words


@dataclass
class StagePlan:
    index: int
    name: str  # "2-map": the file name of its trace, as `sage run` names stages
    call: StageCall
    op: Operator  # built here for its facts (tick interval...); never set up here
    replicas: int

    @property
    def prog(self) -> str:
        return self.call.verb.prog


def parse_replicas(specs: list[str] | dict[str, int] | None) -> dict[str, int]:
    """`["embed=2", "3=1"]` -> {"embed": 2, "3": 1}: a stage by command name, by its
    1-based position, or by its `sage run` name (`2-embed`)."""
    if specs is None:
        return {}
    if isinstance(specs, dict):
        return {str(k): int(v) for k, v in specs.items()}
    out: dict[str, int] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--replicas {spec!r}: expected STAGE=N with N >= 1 (e.g. embed=2)")
        out[key] = int(value)
    return out


def default_replicas(call: StageCall) -> int:
    """A stage's `--workers N`, else one actor for a stage that keeps state or holds its whole
    input and two otherwise (a pool that survives the loss of one actor without a pause)."""
    if call.opts.workers > 1:
        return call.opts.workers
    return 2 if call.verb.replicable else 1


def plan_stages(stages: list[list[str]], replicas: dict[str, int]) -> list[StagePlan]:
    """Check `stages` (each `["sage", VERB, ARGS...]`) for the Ray engine and plan them; raise
    UsageError (or the operator's own error, converted) for what the engine would refuse."""
    if not stages:
        raise UsageError("the pipeline has no stages")
    plans: list[StagePlan] = []
    used: set[str] = set()
    for index, argv in enumerate(stages):
        words = stage_words(argv)
        if words is argv or not words:
            shown = argv[0] if argv else "(empty)"
            raise UsageError(
                f"stage {index + 1} is `{shown}`: the Ray engine runs only sage "
                "stages (run other programs outside the pipeline)"
            )
        call = parse_stage(argv)
        verb = call.verb
        if index > 0 and not call.reads_stdin:
            raise UsageError(
                f"stage {index + 1} ({verb.prog}) reads no input: only the first stage can "
                "be a source"
            )
        refuse_opted_out(verb, call.opts)
        try:
            op = call.factory()
        except Exception as exc:  # noqa: BLE001 - an OptionError says what is wrong
            raise convert_operator_error(exc) or exc from None
        name = f"{index + 1}-{verb.command}"  # as `sage run` names it (4-index)
        keys = [k for k in (name, str(index + 1), verb.name, verb.command) if k in replicas]
        n = replicas[keys[0]] if keys else default_replicas(call)
        used.update(keys)
        refuse_opted_out(verb, call.opts, copies=n)
        plans.append(StagePlan(index, name, call, op, n))
    unknown = set(replicas) - used
    if unknown:
        raise UsageError(
            f"--replicas {sorted(unknown)[0]}=...: no such stage (use a command "
            "name, a position from 1, or a name such as 2-embed)"
        )
    return plans
