"""The MoA engine: specs, policies, prompts, the run and its events."""

from moa_stream.engine import events
from moa_stream.engine.events import *  # noqa: F403
from moa_stream.engine.layer import Call, CallStatus, Decision, LayerState, Reference, UsableAnswer
from moa_stream.engine.policies import (
    AllOf,
    AnyOf,
    Deadline,
    Fire,
    Partial,
    Policy,
    Quorum,
    WaitAll,
    parse_policy,
)
from moa_stream.engine.prompts import PromptTemplates, build_reference_messages
from moa_stream.engine.run import MoARun, RunResult
from moa_stream.engine.similarity import (
    agreement,
    conclusion,
    conclusion_match,
    final_line_match,
    word_jaccard,
)
from moa_stream.engine.spec import Agent, Layer, LayerCut, MoA, moa, moa_lite, self_moa, single
from moa_stream.engine.staircase import Continuation, Staircase
from moa_stream.engine.streams import Hedge, HedgedStream, TimedStream

__all__ = [
    "Agent",
    "AllOf",
    "AnyOf",
    "Call",
    "CallStatus",
    "Continuation",
    "Deadline",
    "Decision",
    "Fire",
    "Hedge",
    "HedgedStream",
    "Layer",
    "LayerCut",
    "LayerState",
    "MoA",
    "MoARun",
    "Partial",
    "Policy",
    "PromptTemplates",
    "Quorum",
    "Reference",
    "RunResult",
    "Staircase",
    "TimedStream",
    "UsableAnswer",
    "WaitAll",
    "agreement",
    "build_reference_messages",
    "conclusion",
    "conclusion_match",
    "final_line_match",
    "moa",
    "moa_lite",
    "parse_policy",
    "self_moa",
    "single",
    "word_jaccard",
]
# The event types and the run report, as ``events.__all__`` lists them (one list to keep).
__all__ += events.__all__
__all__.sort()
