"""Request parsing and the up-front plan of a simulated reply. Pure: no I/O, no clock.

Everything a reply will do (its tokens, when each one goes out relative to the start, which
fault strikes and where) is decided here before the first byte is written, from seeded random
streams, so the server's per-chunk work is only waiting and writing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, cast

import orjson

from moa_stream.sim._rng import seeded_rng
from moa_stream.sim.profiles import FAULT_KINDS, FaultKind, SimModel
from moa_stream.sim.quiz import choose_answer, compose_answer_tokens, find_question
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


class RequestError(Exception):
    """A request the simulator refuses, as an OpenAI error (status, message, type, param, code)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


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

    @property
    def prompt_text(self) -> str:
        """Every message's text, one per line."""
        return "\n".join(content for _, content in self.messages)

    @property
    def sample(self) -> tuple[int | None, int | str | None]:
        """What varies the sample between otherwise equal requests: OpenAI ``seed``, sim sample."""
        return (self.seed, None if self.sim is None else self.sim.sample)


def _bad(param: str, message: str, code: str = "invalid_type") -> RequestError:
    return RequestError(400, message, param=param, code=code)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _opt_int(
    body: dict[str, Any], name: str, *, minimum: int, param: str | None = None
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


def _opt_number(body: dict[str, Any], name: str, *, param: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _bad(param, f"Invalid type for '{param}': expected a number.")
    if value < 0:
        raise _bad(param, f"Invalid '{param}': must be >= 0.", "invalid_value")
    return float(value)


def _opt_bool(body: dict[str, Any], name: str, *, param: str | None = None) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(param or name, f"Invalid type for '{param or name}': expected a boolean.")
    return value


def _content_text(content: object, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        # Content parts: only text parts carry prompt text; images and the like are ignored.
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                text = part.get("text")
                if isinstance(text, str):
                    texts.append(text)
        return "".join(texts)
    raise _bad(
        f"messages.[{index}].content",
        f"Invalid type for 'messages.[{index}].content': expected a string or an array.",
    )


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

    Unknown fields are ignored, as OpenAI-compatible servers do.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RequestError(
            400,
            "We could not parse the JSON body of your request. The body must be valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.", code="invalid_json")

    model = body.get("model")
    if model is None:
        raise _bad("model", "You must provide a model parameter.", "missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("model", "Invalid type for 'model': expected a string.")

    raw_messages = body.get("messages")
    if raw_messages is None:
        raise _bad(
            "messages", "Missing required parameter: 'messages'.", "missing_required_parameter"
        )
    if not isinstance(raw_messages, list):
        raise _bad("messages", "Invalid type for 'messages': expected an array.")
    if not raw_messages:
        raise _bad("messages", "Invalid 'messages': empty array.", "empty_array")
    messages = []
    for i, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise _bad(f"messages.[{i}]", f"Invalid type for 'messages.[{i}]': expected an object.")
        role = message.get("role")
        if role is None:
            raise _bad(
                f"messages.[{i}].role",
                f"Missing required parameter: 'messages.[{i}].role'.",
                "missing_required_parameter",
            )
        if not isinstance(role, str):
            raise _bad(
                f"messages.[{i}].role",
                f"Invalid type for 'messages.[{i}].role': expected a string.",
            )
        messages.append((role, _content_text(message.get("content"), i)))

    stream = _opt_bool(body, "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options", "Invalid type for 'stream_options': expected an object.")
        include_usage = _opt_bool(options, "include_usage", param="stream_options.include_usage")

    max_tokens = _opt_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", minimum=1)

    stop_value = body.get("stop")
    stop: tuple[str, ...] = ()
    if isinstance(stop_value, str):
        stop = (stop_value,)
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = tuple(stop_value)
    elif stop_value is not None:
        raise _bad("stop", "Invalid type for 'stop': expected a string or an array of strings.")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _bad("seed", "Invalid type for 'seed': expected an integer.")
    n = _opt_int(body, "n", minimum=1)
    if n is not None and n != 1:
        # Self-MoA sends separate requests; one choice per request keeps every stream simple.
        raise _bad(
            "n", "Invalid 'n': this server returns one choice per request.", "unsupported_value"
        )

    digest = hashlib.blake2b(orjson.dumps(messages), digest_size=16).hexdigest()
    return ParsedRequest(
        model=model,
        messages=tuple(messages),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        stop=stop,
        seed=cast("int | None", seed),
        sim=_parse_sim(body.get("sim")),
        prompt_digest=digest,
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
) -> Plan:
    """Decide a reply.

    Text depends on (seed, model, prompt, sample) only, so a retry gets the same text; timing
    and random faults also depend on ``occurrence`` (how many times this exact request was seen
    before), so a retry gets fresh draws. ``fault`` forces a fault; ``random_faults=False``
    turns the model's own fault probabilities off.
    """
    sim = req.sim or SimOptions()
    contents = [content for _, content in req.messages]
    prompt_tokens = count_prompt_tokens(contents)

    text_rng = seeded_rng("text", seed, model.name, req.prompt_digest, req.sample)
    n = sim.tokens if sim.tokens is not None else model.sample_answer_tokens(text_rng)
    prompt_text = req.prompt_text
    question = find_question(prompt_text)
    answer: int | None = None
    if question is not None:
        answer = choose_answer(
            question,
            prompt_text,
            model=model.name,
            seed=seed,
            sample=req.sample,
            accuracy=model.accuracy,
        )
        tokens = compose_answer_tokens(text_rng, n, answer, model.answer_at)
    else:
        tokens = generate_tokens(text_rng, n)

    tokens, _ = apply_stop(tokens, req.stop)
    finish_reason = "stop"
    if req.max_tokens is not None and len(tokens) > req.max_tokens:
        tokens = tokens[: req.max_tokens]
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
    if model.context_window is not None and prompt_tokens > model.context_window:
        fault = "context_overflow"
    fault_at = min(fault_at, n) if fault in MID_STREAM_FAULTS else 0

    faults = model.faults
    stall_s = sim.stall_s if sim.stall_s is not None else faults.stall_s
    if sim.ttft is not None:
        ttft = sim.ttft
    else:
        ttft = model.latency.sample_ttft(timing_rng, prompt_tokens)
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
    )
