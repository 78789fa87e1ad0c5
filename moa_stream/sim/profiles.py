"""Latency and fault profiles, simulated models, and the built-in model classes.

Time to first token (TTFT) is modelled as::

    queueing (waiting for a free slot, if the model has ``slots``)
    + prompt_tokens / prefill_tokens_per_s            (prompt tokens ~ characters / 4)
    + base TTFT: lognormal with median ``ttft_p50`` and 95th percentile ``ttft_p95``
      (fixed at ``ttft_p50`` when ``ttft_p95`` is None), capped at ``ttft_max``

then tokens follow at ``tokens_per_s`` (scaled per request by a lognormal factor with sigma
``throughput_sigma``) with per-token gaps jittered by a mean-one lognormal factor with sigma
``decode_jitter``.

Built-in classes, :data:`PROFILES` (rounded class values, approximate; the TTFT figures are for a
near-empty prompt, so with a 1,000-token prompt add ``1000 / prefill``):

==========  ========  ========  ======  =======  ==========================================
name        TTFT p50  TTFT p95  decode  prefill  class of model
==========  ========  ========  ======  =======  ==========================================
small-fast  0.25 s    0.60 s    180     20,000   GPT-4o mini, Gemini Flash, 8B on fast hosts
medium      0.45 s    1.10 s    100     10,000   GPT-4o, Claude Sonnet, 70B
large-slow  1.00 s    2.50 s    45      4,000    Claude Opus, 405B
heavy-tail  0.50 s    4.00 s    80      8,000    a busy shared endpoint (cold starts, queues)
reasoning   6.00 s    20.0 s    120     8,000    o-series, R1: TTFT includes the thinking
==========  ========  ========  ======  =======  ==========================================

(decode and prefill in tokens per second)

Source: the medians published by Artificial Analysis (artificialanalysis.ai, LLM performance
leaderboard: "time to first token" and "output speed" at its 1k-input-token workload) for
models of each class, rounded; the p95 values are assumptions of the spread seen across
providers and hours, not published figures. See ``docs/simulator.md``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Literal, get_args

from moa_stream._exceptions import ConfigError

__all__ = [
    "CONTINUATION_PROFILES",
    "FAULT_KINDS",
    "PROFILES",
    "ContinuationProfile",
    "FaultKind",
    "FaultProfile",
    "LatencyProfile",
    "OVERFLOW_STYLES",
    "OverflowStyle",
    "SimModel",
    "default_models",
]

# z-score of the 95th percentile of a standard normal: sigma = ln(p95/p50) / z95.
_Z95 = 1.6448536269514722

#: The name of a fault kind; see :class:`FaultProfile`.
FaultKind = Literal[
    "rate_limit",
    "server_error",
    "stall_first",
    "stall_mid",
    "reset_mid",
    "malformed",
    "error_frame",
    "context_overflow",
    "keepalive",
]

#: Every fault the simulator can inject, in the order :meth:`FaultProfile.pick` rolls them.
FAULT_KINDS: tuple[FaultKind, ...] = get_args(FaultKind)

#: How a model's server answers a prompt longer than its context window; see
#: :attr:`SimModel.overflow`.
OverflowStyle = Literal["openai", "llama-server", "llama-cpp-python"]
OVERFLOW_STYLES: tuple[OverflowStyle, ...] = ("openai", "llama-server", "llama-cpp-python")


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, path=path)


def _check_probabilities(profile: object, names: Iterable[str]) -> None:
    """Each of ``profile``'s fields ``names`` is a probability."""
    for name in names:
        p = getattr(profile, name)
        _check(0.0 <= p <= 1.0, name, "must be a probability in 0..1")


def _lognormal_factor(rng: random.Random, sigma: float) -> float:
    """A lognormal factor with mean 1 (mu = -sigma^2/2), so jitter keeps the average rate."""
    if sigma <= 0.0:
        return 1.0
    return math.exp(rng.gauss(-0.5 * sigma * sigma, sigma))


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """When a simulated model's tokens come out. Times in seconds, rates in tokens per second.

    ``ttft_p50``/``ttft_p95`` shape the base TTFT (lognormal; fixed when ``ttft_p95`` is None or
    equal to ``ttft_p50``); ``ttft_max`` caps it. ``prefill_tokens_per_s`` adds a delay
    proportional to the prompt (None: free). ``tokens_per_s`` is the decode rate (``math.inf``
    sends every token at once); ``throughput_sigma`` varies it per request and
    ``decode_jitter`` per token.
    """

    ttft_p50: float
    tokens_per_s: float
    ttft_p95: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_jitter: float = 0.0
    throughput_sigma: float = 0.0
    ttft_max: float | None = None

    def __post_init__(self) -> None:
        _check(self.ttft_p50 >= 0.0, "ttft_p50", "must be >= 0")
        _check(self.tokens_per_s > 0.0, "tokens_per_s", "must be > 0")
        if self.ttft_p95 is not None:
            _check(self.ttft_p95 >= self.ttft_p50, "ttft_p95", "must be >= ttft_p50")
            _check(self.ttft_p50 > 0.0 or self.ttft_p95 == 0.0, "ttft_p50", "must be > 0")
        if self.prefill_tokens_per_s is not None:
            _check(self.prefill_tokens_per_s > 0.0, "prefill_tokens_per_s", "must be > 0")
        _check(self.decode_jitter >= 0.0, "decode_jitter", "must be >= 0")
        _check(self.throughput_sigma >= 0.0, "throughput_sigma", "must be >= 0")
        if self.ttft_max is not None:
            _check(self.ttft_max >= 0.0, "ttft_max", "must be >= 0")

    @classmethod
    def fixed(
        cls, ttft: float, tokens_per_s: float, *, prefill_tokens_per_s: float | None = None
    ) -> LatencyProfile:
        """No randomness: the first token after ``ttft`` seconds (plus prefill, if given), then
        exactly ``tokens_per_s``. For tests."""
        return cls(
            ttft_p50=ttft, tokens_per_s=tokens_per_s, prefill_tokens_per_s=prefill_tokens_per_s
        )

    @property
    def ttft_sigma(self) -> float:
        """Sigma of the lognormal base TTFT (0 when fixed)."""
        if self.ttft_p95 is None or self.ttft_p95 <= self.ttft_p50 or self.ttft_p50 <= 0.0:
            return 0.0
        return math.log(self.ttft_p95 / self.ttft_p50) / _Z95

    def scaled(self, factor: float) -> LatencyProfile:
        """This profile with every delay multiplied by ``factor`` (and rates divided by it),
        e.g. 0.1 to run a realistic mix ten times faster."""
        _check(factor > 0.0, "factor", "must be > 0")
        return replace(
            self,
            ttft_p50=self.ttft_p50 * factor,
            ttft_p95=None if self.ttft_p95 is None else self.ttft_p95 * factor,
            tokens_per_s=self.tokens_per_s / factor,
            prefill_tokens_per_s=(
                None if self.prefill_tokens_per_s is None else self.prefill_tokens_per_s / factor
            ),
            ttft_max=None if self.ttft_max is None else self.ttft_max * factor,
        )

    def sample_ttft(self, rng: random.Random, prompt_tokens: int = 0) -> float:
        """Prefill plus a base TTFT draw (no queueing), in seconds."""
        sigma = self.ttft_sigma
        base = self.ttft_p50 if sigma == 0.0 else self.ttft_p50 * math.exp(rng.gauss(0.0, sigma))
        if self.ttft_max is not None:
            base = min(base, self.ttft_max)
        prefill = 0.0
        if self.prefill_tokens_per_s is not None:
            prefill = prompt_tokens / self.prefill_tokens_per_s
        return prefill + base

    def sample_gaps(self, rng: random.Random, n: int) -> list[float]:
        """The ``n - 1`` gaps between ``n`` consecutive tokens, in seconds."""
        if n <= 1 or math.isinf(self.tokens_per_s):
            return [0.0] * max(0, n - 1)
        mean = 1.0 / (self.tokens_per_s * _lognormal_factor(rng, self.throughput_sigma))
        jitter = self.decode_jitter
        if jitter <= 0.0:
            return [mean] * (n - 1)
        mu = -0.5 * jitter * jitter
        gauss, exp = rng.gauss, math.exp
        return [mean * exp(gauss(mu, jitter)) for _ in range(n - 1)]


@dataclass(frozen=True, slots=True)
class FaultProfile:
    """Per-request fault probabilities of a model (each in 0..1).

    The first eight kinds exclude one another (their sum must not exceed 1); ``keepalive``
    (``: keep-alive`` comments interleaved with the stream) is rolled on its own. Faults:

    * ``rate_limit``: HTTP 429 with ``Retry-After`` and ``retry-after-ms`` (``retry_after_s``).
    * ``server_error``: HTTP 500 with an OpenAI error body.
    * ``stall_first``: ``stall_s`` of silence before the first token, then a normal stream.
    * ``stall_mid``: ``stall_s`` of silence part-way through, then the rest.
    * ``reset_mid``: the connection is aborted part-way through (no ``[DONE]``).
    * ``malformed``: one ``data:`` line of invalid JSON part-way through, then the rest.
    * ``error_frame``: ``data: {"error": ...}`` then ``data: [DONE]`` part-way through, after
      status 200 (an HTTP 500 for non-streaming requests).
    * ``context_overflow``: the answer the model's server gives a prompt longer than its
      context window, in the model's :attr:`~SimModel.overflow` style (also what happens,
      without any fault, when the prompt exceeds :attr:`SimModel.context_window`).
    """

    rate_limit: float = 0.0
    server_error: float = 0.0
    stall_first: float = 0.0
    stall_mid: float = 0.0
    reset_mid: float = 0.0
    malformed: float = 0.0
    error_frame: float = 0.0
    context_overflow: float = 0.0
    keepalive: float = 0.0
    retry_after_s: float = 1.0
    stall_s: float = 30.0
    keepalive_interval_s: float = 0.5

    def __post_init__(self) -> None:
        _check_probabilities(self, FAULT_KINDS)
        _check(self.exclusive_total <= 1.0 + 1e-9, "faults", "probabilities add up to more than 1")
        _check(self.retry_after_s >= 0.0, "retry_after_s", "must be >= 0")
        _check(self.stall_s >= 0.0, "stall_s", "must be >= 0")
        _check(self.keepalive_interval_s > 0.0, "keepalive_interval_s", "must be > 0")

    @property
    def exclusive_total(self) -> float:
        """Probability that a request gets one of the mutually exclusive faults."""
        return sum(float(getattr(self, kind)) for kind in FAULT_KINDS if kind != "keepalive")

    def pick(self, rng: random.Random) -> tuple[FaultKind | None, bool]:
        """Roll this request's fault and whether it carries keep-alive comments."""
        u = rng.random()
        keepalive = rng.random() < self.keepalive
        acc = 0.0
        for kind in FAULT_KINDS:
            if kind == "keepalive":
                continue
            acc += float(getattr(self, kind))
            if u < acc:
                return kind, keepalive
        return None, keepalive


@dataclass(frozen=True, slots=True)
class ContinuationProfile:
    """How faithfully a model continues an answer it is asked to continue (each field a
    probability in 0..1, rolled once per continuing request).

    Real models do not all take a prefill or a "continue" turn as an instruction to go on from
    the last word: small ones often start their answer again, stop after restating it, or copy
    the prompt's quoting into the answer. A benchmark that continues perfectly flatters every
    strategy that continues answers, so each simulated model says how it fails:

    * ``restart_at_boundary``: after a prefill that ends a sentence or a line, the reply first
      restates the opening of the answer so far (on a new line), then goes on.
    * ``restart_mid_sentence``: the same after a prefill that ends mid-sentence (a model
      finishing a sentence rarely starts over).
    * ``restart_after_turn``: the same after appended turns, with no new line (a new turn).
    * ``stop_after_restart``: of the replies that restart after appended turns, the share that
      stop once the restatement has given a few words, with ``finish_reason: "stop"``.
    * ``copy_markup``: the reply begins with, or somewhere includes, a piece of the request's
      own markup: its last closing tag, its last opening tag line, or a sentence of the
      instructions that follow its quoted blocks.
    * ``refuse_prefill``: a request that ends with an assistant message to continue is refused
      with HTTP 400, as models without prefill support (recent Claude models) answer.
    * ``loop_on_short_drafts``: a fresh request (not a continuation) that quotes drafts averaging
      fewer than :data:`~moa_stream.sim._flaws.SHORT_DRAFT_WORDS` words (an aggregator started
      on a few sentences of each) is answered by a loop: the reply's first sentence, again and
      again, to its planned length.

    ``perfect`` (every probability 0) continues exactly, as the simulator always did.
    """

    restart_at_boundary: float = 0.0
    restart_mid_sentence: float = 0.0
    restart_after_turn: float = 0.0
    stop_after_restart: float = 0.0
    copy_markup: float = 0.0
    refuse_prefill: float = 0.0
    loop_on_short_drafts: float = 0.0

    def __post_init__(self) -> None:
        _check_probabilities(self, (f.name for f in fields(self)))

    @property
    def perfect(self) -> bool:
        """Whether the model always continues exactly (every probability is 0)."""
        return not any(getattr(self, f.name) for f in fields(self))


#: Built-in continuation behaviours; ``small`` is calibrated on SmolLM2-135M served by
#: llama.cpp's llama-server, see ``docs/simulator.md``.
CONTINUATION_PROFILES: MappingProxyType[str, ContinuationProfile] = MappingProxyType(
    {
        "perfect": ContinuationProfile(),
        "strong": ContinuationProfile(
            restart_at_boundary=0.03,
            restart_mid_sentence=0.0,
            restart_after_turn=0.03,
            stop_after_restart=0.2,
            copy_markup=0.01,
        ),
        "small": ContinuationProfile(
            restart_at_boundary=0.7,
            restart_mid_sentence=0.1,
            restart_after_turn=0.6,
            stop_after_restart=0.5,
            copy_markup=0.3,
            loop_on_short_drafts=0.5,
        ),
    }
)

_PERFECT = CONTINUATION_PROFILES["perfect"]


#: The built-in model classes, one row each (see the module docstring for the figures and their
#: source); seconds for times, tokens per second for rates.
_CLASSES: tuple[tuple[str, float, float, float, float, float, float, float], ...] = (
    # name, TTFT p50, TTFT p95, TTFT cap, decode, prefill, decode_jitter, throughput_sigma
    ("small-fast", 0.25, 0.60, 10.0, 180.0, 20_000.0, 0.25, 0.15),
    ("medium", 0.45, 1.10, 15.0, 100.0, 10_000.0, 0.25, 0.15),
    ("large-slow", 1.00, 2.50, 30.0, 45.0, 4_000.0, 0.30, 0.20),
    ("heavy-tail", 0.50, 4.00, 30.0, 80.0, 8_000.0, 0.50, 0.30),
    ("reasoning", 6.00, 20.0, 60.0, 120.0, 8_000.0, 0.25, 0.15),
)

#: The built-in model classes by name; see the module docstring for the figures and their source.
PROFILES: MappingProxyType[str, LatencyProfile] = MappingProxyType(
    {
        name: LatencyProfile(
            ttft_p50=p50,
            ttft_p95=p95,
            ttft_max=cap,
            tokens_per_s=decode,
            prefill_tokens_per_s=prefill,
            decode_jitter=jitter,
            throughput_sigma=sigma,
        )
        for name, p50, p95, cap, decode, prefill, jitter, sigma in _CLASSES
    }
)

# Fast and fixed: a model built without a profile is meant for a test, not for realism.
_TEST_LATENCY = LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000.0)


@dataclass(frozen=True, slots=True)
class SimModel:
    """One named simulated model.

    ``answer_tokens`` is the median reply length (exact when ``answer_tokens_sigma`` is 0,
    otherwise lognormal with that sigma, clipped to 1..``max_answer_tokens``). ``accuracy`` and
    ``answer_at`` drive the quiz (see :mod:`moa_stream.sim.quiz`). ``slots`` limits concurrent
    requests (more wait in a queue, which adds to their TTFT); None means unlimited.
    The default latency is fast and fixed, for tests; use :data:`PROFILES` for realism.

    Continuations (see :mod:`moa_stream.sim._continue`): ``continue_trailing_assistant``
    continues a final assistant message without being asked, and ``echo_prefill`` repeats it
    at the start of the first delta, both as llama.cpp's llama-server does.
    ``prefix_cache`` turns the model's prefix cache on (prompt blocks it served recently cost
    no prefill time and are reported as ``cached_tokens``); a cached prefix shorter than
    ``cache_min_prefix`` tokens counts for nothing, as providers with a minimum cacheable
    prompt (1,024 tokens at OpenAI and Anthropic) report. ``continuation`` says how faithfully
    the model continues an answer (see :class:`ContinuationProfile`; default: perfectly).

    ``context_window`` (tokens): a prompt longer than it gets the model's ``overflow`` answer;
    so does, in the ``openai`` style, a prompt that fits but leaves less room than the
    request's ``max_tokens``, as OpenAI and vLLM count both. A reply never runs past the window
    (it ends with ``finish_reason: "length"``).
    """

    name: str
    latency: LatencyProfile = _TEST_LATENCY
    faults: FaultProfile = field(default_factory=FaultProfile)
    answer_tokens: int = 64
    answer_tokens_sigma: float = 0.0
    max_answer_tokens: int = 4096
    accuracy: float = 0.7
    answer_at: Literal["end", "start"] = "end"
    slots: int | None = None
    owned_by: str = "moa-stream-sim"
    continue_trailing_assistant: bool = False
    echo_prefill: bool = False
    prefix_cache: bool = True
    context_window: int | None = None
    overflow: OverflowStyle = "openai"
    sends_usage: bool = True
    continuation: ContinuationProfile = _PERFECT
    cache_min_prefix: int = 0

    def __post_init__(self) -> None:
        where = f"sim.models.{self.name}"
        _check(bool(self.name), "sim.models.name", "must not be empty")
        _check(self.answer_tokens >= 1, f"{where}.answer_tokens", "must be >= 1")
        _check(self.answer_tokens_sigma >= 0.0, f"{where}.answer_tokens_sigma", "must be >= 0")
        _check(self.max_answer_tokens >= 1, f"{where}.max_answer_tokens", "must be >= 1")
        _check(0.0 <= self.accuracy <= 1.0, f"{where}.accuracy", "must be in 0..1")
        _check(self.answer_at in ("end", "start"), f"{where}.answer_at", "must be end or start")
        _check(self.slots is None or self.slots >= 1, f"{where}.slots", "must be >= 1")
        _check(
            self.context_window is None or self.context_window >= 1,
            f"{where}.context_window",
            "must be >= 1",
        )
        _check(
            self.overflow in OVERFLOW_STYLES,
            f"{where}.overflow",
            f"must be one of {', '.join(OVERFLOW_STYLES)}",
        )
        _check(self.cache_min_prefix >= 0, f"{where}.cache_min_prefix", "must be >= 0")

    def sample_answer_tokens(self, rng: random.Random) -> int:
        """This request's reply length in tokens."""
        n = float(self.answer_tokens)
        if self.answer_tokens_sigma > 0.0:
            n *= math.exp(rng.gauss(0.0, self.answer_tokens_sigma))
        return max(1, min(self.max_answer_tokens, round(n)))


def default_models() -> list[SimModel]:
    """The model set ``moa-stream demo`` and ``moa-stream serve`` use by default.

    Four proposers of mixed classes and an aggregator, named after their class:
    ``small-fast`` (accuracy 0.55), ``medium`` (0.70), ``large-slow`` (0.85), ``heavy-tail``
    (0.65), and ``aggregator`` (medium latency, accuracy 0.80). Replies are about 120 tokens
    (aggregator 160), varying with sigma 0.3.
    """

    def model(name: str, profile: str, accuracy: float, tokens: int = 120) -> SimModel:
        return SimModel(
            name=name,
            latency=PROFILES[profile],
            answer_tokens=tokens,
            answer_tokens_sigma=0.3,
            accuracy=accuracy,
        )

    return [
        model("small-fast", "small-fast", 0.55),
        model("medium", "medium", 0.70),
        model("large-slow", "large-slow", 0.85),
        model("heavy-tail", "heavy-tail", 0.65),
        model("aggregator", "medium", 0.80, tokens=160),
    ]
