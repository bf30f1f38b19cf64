"""shim: remove once nothing imports it. The parse step lives in sage_cli.verbs."""

from sage_cli.verbs import StageCall, parse_stage, stage_words

__all__ = ["StageCall", "parse_stage", "stage_words"]
