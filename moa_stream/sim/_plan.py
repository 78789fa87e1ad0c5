"""Request parsing and the up-front plan of a simulated reply. Pure: no I/O, no clock.

Everything a reply will do (its tokens, when each one goes out relative to the start, which
fault strikes and where) is decided here before the first byte is written, from seeded random
streams, so the server's per-chunk work is only waiting and writing.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson

from moa_stream._wire import WireError, optional_bool, parse_chat_request
from moa_stream.sim._continue import ContinuationInfo, anchor_digest
from moa_stream.sim._flaws import Flaw, continue_with_flaws, loop_on_short_drafts
from moa_stream.sim._rng import seeded_rng
from moa_stream.sim.profiles import FAULT_KINDS, FaultKind, SimModel
from moa_stream.sim.quiz import (
    AnswerAt,
    choose_answer,
    find_question,
    visible_answers,
)
from moa_stream.sim.textgen import apply_stop, count_prompt_tokens, generate_tokens

__all__ = [
    "MID_STREAM_FAULTS",
    "ParsedRequest",
    "Plan",
    "RequestError",
    "SimOptions",
    "build_plan",
    "parse_request",
]

#: Faults that strike after the response has started, at token index ``Plan.fault_at``.
MID_STREAM_FAULTS: frozenset[str] = frozenset(
    {"stall_mid", "reset_mid", "malformed", "error_frame"}
)


#: A request the simulator refuses. The simulator answers bad requests exactly as the server
#: does: one parser and one error type for both (:mod:`moa_stream._wire`).
RequestError = WireError


@dataclass(frozen=True, slots=True)
class SimOptions:
    """The request's ``"sim"`` field: per-request fault forcing and exact overrides."""

    fault: FaultKind | None = None
    times: int | None = None
    key: str | None = None
    ttft: float | None = None
    tokens: int | None = None
    stall_s: float | None = None
    after: int | None = None
    retry_after: float | None = None
    sample: int | str | None = None


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """The fields of a chat-completions request the simulator acts on."""

    model: str
    messages: tuple[tuple[str, str], ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    sim: SimOptions | None = None
    prompt_digest: str = ""
    continue_final_message: bool = False
    last_prefix: bool = False

    @property
    def prompt_text(self) -> str:
        """Every message's text, one per line."""
        return "\n".join(content for _, content in self.messages)

    @property
    def sample(self) -> tuple[int | None, int | str | None]:
        """What varies the sample between otherwise equal requests: OpenAI ``seed``, sim sample."""
        return (self.seed, None if self.sim is None else self.sim.sample)

    @property
    def repeat_key(self) -> str:
        """What makes two requests the same one (a retry): model, messages and sample."""
        return f"{self.model}/{self.prompt_digest}/{self.sample!r}"


def _bad(param: str, message: str, code: str = "invalid_type") -> RequestError:
    return RequestError(400, message, param=param, code=code)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_int(
    body: Mapping[str, Any], name: str, *, minimum: int, param: str | None = None
) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    param = param or name
    if not _is_int(value):
        raise _bad(param, f"Invalid type for '{param}': expected an integer.")
    if value < minimum:
        raise _bad(param, f"Invalid '{param}': must be >= {minimum}.", "invalid_value")
    return cast(int, value)


def _opt_number(body: Mapping[str, Any], name: str, *, param: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _bad(param, f"Invalid type for '{param}': expected a number.")
    if value < 0:
        raise _bad(param, f"Invalid '{param}': must be >= 0.", "invalid_value")
    return float(value)


def _parse_sim(value: object) -> SimOptions | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("sim", "Invalid type for 'sim': expected an object.")
    fault = value.get("fault")
    if fault is not None and fault not in FAULT_KINDS:
        raise _bad(
            "sim.fault",
            f"Invalid 'sim.fault': expected one of {', '.join(FAULT_KINDS)}.",
            "invalid_value",
        )
    key = value.get("key")
    if key is not None and not isinstance(key, str):
        raise _bad("sim.key", "Invalid type for 'sim.key': expected a string.")
    sample = value.get("sample")
    if sample is not None and not (_is_int(sample) or isinstance(sample, str)):
        raise _bad("sim.sample", "Invalid type for 'sim.sample': expected an integer or a string.")
    return SimOptions(
        fault=fault,
        times=_opt_int(value, "times", minimum=0, param="sim.times"),
        key=key,
        ttft=_opt_number(value, "ttft", param="sim.ttft"),
        tokens=_opt_int(value, "tokens", minimum=0, param="sim.tokens"),
        stall_s=_opt_number(value, "stall_s", param="sim.stall_s"),
        after=_opt_int(value, "after", minimum=0, param="sim.after"),
        retry_after=_opt_number(value, "retry_after", param="sim.retry_after"),
        sample=cast("int | str | None", sample),
    )


def parse_request(raw: bytes) -> ParsedRequest:
    """Parse and check a chat-completions body; raise :class:`RequestError` (400) if it is bad.

    The checks are the server's own (:func:`moa_stream._wire.parse_chat_request`); the ``sim``
    field is the simulator's extension. Unknown fields are ignored, as OpenAI-compatible
    servers do.
    """
    req = parse_chat_request(raw)
    messages = [(m["role"], m["content"]) for m in req.messages]
    raw_messages = req.body.get("messages")
    last = raw_messages[-1] if isinstance(raw_messages, list) and raw_messages else None
    last_prefix = isinstance(last, dict) and last.get("prefix") is True
    continue_final = optional_bool(req.body, "continue_final_message")
    if continue_final and req.body.get("add_generation_prompt", True) is not False:
        # vLLM refuses the pair: a generation prompt opens a new message, not the last one.
        raise _bad(
            "continue_final_message",
            "continue_final_message and add_generation_prompt can not both be true.",
            "invalid_value",
        )
    digest = hashlib.blake2b(orjson.dumps(messages), digest_size=16).hexdigest()
    return ParsedRequest(
        model=req.model,
        messages=tuple(messages),
        stream=req.stream,
        include_usage=req.include_usage,
        max_tokens=req.max_tokens,
        stop=req.stop or (),
        seed=req.seed,
        sim=_parse_sim(req.body.get("sim")),
        prompt_digest=digest,
        continue_final_message=continue_final,
        last_prefix=last_prefix,
    )


@dataclass(slots=True)
class Plan:
    """Everything one reply will do, times in seconds after its start (a slot was free).

    ``offsets[i]`` is when token ``i`` goes out; ``end_offset`` when the finish chunk does.
    ``fault_at`` is the number of content tokens sent before a mid-stream fault strikes.
    """

    tokens: list[str]
    finish_reason: str
    prompt_tokens: int
    offsets: list[float]
    end_offset: float
    fault: FaultKind | None = None
    fault_at: int = 0
    keepalive: bool = False
    retry_after_s: float = 1.0
    keepalive_interval_s: float = 0.5
    question_id: str | None = None
    answer: int | None = None
    cached_tokens: int = 0
    continuation: str | None = None
    continuation_flaws: tuple[Flaw, ...] = ()

    @property
    def refused(self) -> bool:
        """Whether the model refuses the request's prefill (an HTTP 400, nothing planned)."""
        return "refused" in self.continuation_flaws

    @property
    def fault_label(self) -> str | None:
        """The injected fault as records name it (keep-alive comments count as one)."""
        if self.fault is not None:
            return self.fault
        return "keepalive" if self.keepalive else None

    @property
    def first_offset(self) -> float:
        """When the first token (or, with none, the finish chunk) goes out."""
        return self.offsets[0] if self.offsets else self.end_offset

    def event_offset(self, k: int) -> float:
        """When something scheduled after ``k`` content tokens happens."""
        return self.offsets[k] if k < len(self.offsets) else self.end_offset


def build_plan(
    model: SimModel,
    req: ParsedRequest,
    *,
    seed: int,
    occurrence: int = 0,
    fault: FaultKind | None = None,
    random_faults: bool = True,
    continuation: ContinuationInfo | None = None,
    cached_chars: int = 0,
) -> Plan:
    """Decide a reply.

    Text depends on (seed, model, prompt, sample) only, so a retry gets the same text; timing
    and random faults also depend on ``occurrence`` (how many times this exact request was seen
    before), so a retry gets fresh draws. ``fault`` forces a fault; ``random_faults=False``
    turns the model's own fault probabilities off. ``continuation``: what the request
    continues (see :mod:`moa_stream.sim._continue`), continued as the model's
    :class:`~moa_stream.sim.profiles.ContinuationProfile` allows (see
    :mod:`moa_stream.sim._flaws`); ``cached_chars``: how much of its prompt the model's prefix
    cache held, which costs no prefill time (none below the model's ``cache_min_prefix``).
    """
    sim = req.sim or SimOptions()
    contents = [content for _, content in req.messages]
    prompt_tokens = count_prompt_tokens(contents)
    info = continuation or ContinuationInfo(None, "", req.messages)
    cached_tokens = min(prompt_tokens, cached_chars // 4)
    if cached_tokens < model.cache_min_prefix:
        cached_tokens = 0

    # The text belongs to the conversation's anchor, not the whole prompt, so the steps of a
    # staircase, which only add to the prompt's end, continue one planned text.
    anchor = anchor_digest(info.base)
    # What the model reads: the whole prompt but its own answer so far (a prefill, or the
    # assistant turns of appended ones).
    later = req.messages[len(info.base) :]
    prompt_text = "\n".join(
        [content for _, content in info.base]
        + [content for role, content in later if role != "assistant"]
    )
    question = find_question(prompt_text)
    answer: int | None = None
    if question is not None:
        # An answer line already written stays: the model committed to it.
        committed = visible_answers(info.answer)
        answer = (
            committed[-1]
            if committed
            else choose_answer(
                question,
                prompt_text,
                model=model.name,
                seed=seed,
                sample=req.sample,
                accuracy=model.accuracy,
            )
        )
        n, body = _planned_body(model, seed, anchor, req.sample, sim.tokens, True)
        tokens = _with_answer(body, n, answer, model.answer_at)
    else:
        tokens = list(_planned_body(model, seed, anchor, req.sample, sim.tokens, False)[1])
    flaws: tuple[Flaw, ...] = ()
    if info.kind is not None:
        tokens, whole = _rest_of(tokens, info.answer)
        if not model.continuation.perfect:
            # Its own stream: whether a step misbehaves depends on that step's request only.
            flaw_rng = seeded_rng("flaws", seed, model.name, req.prompt_digest, req.sample)
            reply = continue_with_flaws(
                model.continuation,
                info.kind,
                info.answer,
                tokens,
                rest_is_whole=whole,
                messages=req.messages,
                rng=flaw_rng,
            )
            tokens, flaws = reply.tokens, reply.flaws
        if model.echo_prefill and info.kind == "prefill" and tokens:
            tokens[0] = info.answer + tokens[0]  # llama-server repeats the prefill first
    elif not model.continuation.perfect:
        flaw_rng = seeded_rng("flaws", seed, model.name, req.prompt_digest, req.sample)
        looping = loop_on_short_drafts(model.continuation, tokens, req.messages, flaw_rng)
        if looping is not None:
            tokens, flaws = looping, ("loop",)

    tokens, _ = apply_stop(tokens, req.stop)
    finish_reason = "stop"
    if req.max_tokens is not None and len(tokens) > req.max_tokens:
        tokens = tokens[: req.max_tokens]
        finish_reason = "length"
    overflows = False
    window = model.context_window
    if window is not None:
        overflows = prompt_tokens > window or (
            # OpenAI and vLLM refuse a reply that could not fit; local servers just stop it.
            model.overflow == "openai"
            and req.max_tokens is not None
            and prompt_tokens + req.max_tokens > window
        )
        if not overflows and len(tokens) > window - prompt_tokens:
            tokens = tokens[: window - prompt_tokens]
            finish_reason = "length"
    n = len(tokens)

    timing_rng = seeded_rng("timing", seed, model.name, req.prompt_digest, req.sample, occurrence)
    keepalive = False
    if fault is None and random_faults:
        fault_rng = seeded_rng("fault", seed, model.name, req.prompt_digest, req.sample, occurrence)
        fault, keepalive = model.faults.pick(fault_rng)
        fault_at = fault_rng.randint(1, max(1, n - 1)) if fault in MID_STREAM_FAULTS else 0
    else:
        fault_at = sim.after if sim.after is not None else max(1, n // 2)
    if fault == "keepalive":
        fault, keepalive = None, True
    if overflows:
        fault = "context_overflow"
    fault_at = min(fault_at, n) if fault in MID_STREAM_FAULTS else 0

    faults = model.faults
    stall_s = sim.stall_s if sim.stall_s is not None else faults.stall_s
    if sim.ttft is not None:
        ttft = sim.ttft
    else:
        ttft = model.latency.sample_ttft(timing_rng, prompt_tokens - cached_tokens)
    if fault == "stall_first":
        ttft += stall_s
    gaps = model.latency.sample_gaps(timing_rng, n)

    offsets = [ttft] * n
    t = ttft
    for i, gap in enumerate(gaps, start=1):
        t += gap
        offsets[i] = t
    end_offset = offsets[-1] if offsets else ttft
    if fault == "stall_mid":
        for i in range(fault_at, n):
            offsets[i] += stall_s
        end_offset += stall_s

    return Plan(
        tokens=tokens,
        finish_reason=finish_reason,
        prompt_tokens=prompt_tokens,
        offsets=offsets,
        end_offset=end_offset,
        fault=fault,
        fault_at=fault_at,
        keepalive=keepalive,
        retry_after_s=sim.retry_after if sim.retry_after is not None else faults.retry_after_s,
        keepalive_interval_s=faults.keepalive_interval_s,
        question_id=None if question is None else question.id,
        answer=answer,
        cached_tokens=cached_tokens,
        continuation=info.kind,
        continuation_flaws=flaws,
    )


@functools.lru_cache(maxsize=4096)
def _planned_body(
    model: SimModel,
    seed: int,
    anchor: str,
    sample: object,
    tokens: int | None,
    quiz: bool,
) -> tuple[int, tuple[str, ...]]:
    """A reply's length and filler text, drawn once per conversation: every step of a
    staircase asks for the same planned text again, and drawing 700 words costs milliseconds."""
    text_rng = seeded_rng("text", seed, model.name, anchor, sample)
    n = tokens if tokens is not None else model.sample_answer_tokens(text_rng)
    return n, tuple(generate_tokens(text_rng, max(0, n - 2) if quiz else n))


def _with_answer(body: Sequence[str], n: int, answer: int, answer_at: AnswerAt) -> list[str]:
    """:func:`~moa_stream.sim.quiz.compose_answer_tokens` on an already drawn filler."""
    if answer_at == "start":
        return ["Answer: ", f"{answer}\n" if body else str(answer), *body]
    return [*body, "\nAnswer: " if body else "Answer: ", str(answer)]


def _rest_of(planned: list[str], written: str) -> tuple[list[str], bool]:
    """The tokens of ``planned`` after the text already ``written`` (which may end mid-token),
    and whether they begin with a whole token (not the end of one ``written`` cut).
    If ``written`` is not the planned text's start (another text, edited), the reply goes on
    from the planned token after as many words as were written."""
    pos = 0
    k = 0
    if "".join(planned).startswith(written):
        while k < len(planned) and pos + len(planned[k]) <= len(written):
            pos += len(planned[k])
            k += 1
        rest = planned[k:]
        if rest and pos < len(written):
            rest[0] = rest[0][len(written) - pos :]
            return rest, False
        return rest, True
    return planned[len(written.split()) :], True
