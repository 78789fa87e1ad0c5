"""Configuration: providers, agents and MoA presets in TOML, shared by the CLI and the server.

::

    [providers.local]                 # any OpenAI-compatible endpoint
    base_url = "http://127.0.0.1:8000/v1"
    api_key_env = "LOCAL_API_KEY"     # the variable's name, never the key itself
    max_tokens_field = "max_tokens"   # or "max_completion_tokens"
    continuation = ["turns", "prefill:vllm"]  # how a staircase may continue an answer here
    max_connections = 100             # pooled connections; every agent request holds one
    timeouts = { connect = 5, first_token = 20, idle = 20, total = 300 }
    retry = { max_attempts = 3 }

    [providers.sim]
    kind = "sim"                      # the simulated upstream, started in-process

    [agents.qwen]
    provider = "local"
    model = "qwen2.5-7b-instruct"
    temperature = 0.7

    [moa.fast]                        # exposed by the server as model id "fast"
    proposers = ["qwen", "llama"]
    aggregator = "qwen"
    policy = "quorum(2) | deadline(2.0)"

    [moa.stairs]                      # a staircase: the policy is its start rule
    proposers = ["qwen", "llama"]
    aggregator = "qwen"
    policy = "partial(2, min_tokens=8) | deadline(0.5, partial=true)"
    staircase = { steps = [8, 16, 32, 64], lead = 32, continuation = "auto" }

    [server]
    api_keys_env = "MOA_STREAM_API_KEYS"
    cors_origins = ["*"]

:func:`load_config` checks everything up front; an error is a :class:`moa_stream.ConfigError`
that names the field (``moa.fast.policy``) and the file. :class:`Runtime` turns a config into
live providers and :class:`~moa_stream.engine.MoA` objects, and closes them.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, cast

from moa_stream import _log
from moa_stream._exceptions import ConfigError
from moa_stream._resource import AsyncResource
from moa_stream.engine.policies import Policy, WaitAll, parse_policy, required_completions
from moa_stream.engine.prompts import PromptTemplates
from moa_stream.engine.similarity import (
    Similarity,
    conclusion_match,
    final_line_match,
    word_jaccard,
)
from moa_stream.engine.spec import Agent, Layer, LayerCut, MoA
from moa_stream.engine.staircase import (
    LAYOUTS,
    Continuation,
    Staircase,
    parse_continuation,
    parse_steps,
)
from moa_stream.providers import Provider, RetrySettings, Timeouts
from moa_stream.providers._factory import PROVIDER_KINDS, build_provider

# The package's __init__ imports this module, so this runs on ``import moa_stream``, before any
# of its loggers is used: the library stays silent until the application configures logging.
_log.quiet_until_configured()

if TYPE_CHECKING:
    # Imported where it is started: a configuration without simulated providers never loads
    # the simulator.
    from moa_stream.sim import SimServer

__all__ = [
    "AgentConfig",
    "Config",
    "MoAConfig",
    "ProviderConfig",
    "Runtime",
    "ServerConfig",
    "SimConfig",
    "StaircaseConfig",
    "default_config",
    "load_config",
    "parse_config",
]

SIMILARITIES: dict[str, Similarity] = {
    "conclusion": conclusion_match,
    "word_jaccard": word_jaccard,
    "final_line": final_line_match,
}


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: Literal["openai", "sim", "anthropic", "litellm"] = "openai"
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    headers: Mapping[str, str] = field(default_factory=dict)
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    max_connections: int = 100
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetrySettings = field(default_factory=RetrySettings)
    #: How a staircase may continue an answer on this provider: ``turns`` works with any chat
    #: API; ``prefill:<flavour>`` only where the server continues a final assistant message.
    continuation: tuple[Continuation, ...] = (Continuation("turns"),)


#: The engine's staircase defaults, which the config's table takes as its own.
_STAIRCASE = Staircase()


@dataclass(frozen=True, slots=True)
class StaircaseConfig:
    """A MoA's ``staircase`` table. ``continuation``: ``auto`` (prefill where the provider
    supports it, else turns), ``prefill`` or ``turns``. The other fields and their defaults are
    :class:`~moa_stream.engine.staircase.Staircase`'s."""

    steps: tuple[int, ...] = _STAIRCASE.steps
    lead: int | None = _STAIRCASE.lead
    give_up_after: float | None = _STAIRCASE.give_up_after
    continuation: Literal["auto", "prefill", "turns"] = "auto"
    max_steps: int | None = _STAIRCASE.max_steps
    max_rejects: int = _STAIRCASE.max_rejects
    max_pause: float = _STAIRCASE.max_pause
    guard_words: int = _STAIRCASE.guard_words
    min_news: int = _STAIRCASE.min_news
    context_window: int | None = _STAIRCASE.context_window
    layout: Literal["updates", "whole"] = _STAIRCASE.layout
    loop_restarts: int | None = _STAIRCASE.loop_restarts
    read_ahead: int = _STAIRCASE.read_ahead
    #: The continuation each aggregator (and fallback) uses, resolved against its provider.
    resolved: Mapping[str, Continuation] = field(default_factory=dict)


#: The table's settings that are the engine's :class:`Staircase` fields of the same name (its
#: ``continuation`` is the per-agent resolution, made from ``resolved``).
_STAIRCASE_SETTINGS = tuple(
    f.name
    for f in fields(StaircaseConfig)
    if f.name in {g.name for g in fields(Staircase)} and f.name != "continuation"
)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    name: str
    provider: str
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    system_prompt: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MoAConfig:
    """One MoA preset. ``preset`` is ``moa`` (``layers`` layers of ``proposers``), ``self_moa``
    (``samples`` requests to the first proposer) or ``single`` (only the aggregator)."""

    id: str
    aggregator: str
    preset: Literal["moa", "self_moa", "single"] = "moa"
    proposers: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    layers: int = 1
    samples: int = 4
    policy: Policy = field(default_factory=WaitAll)
    stragglers: Literal["cancel", "keep"] = "cancel"
    on_unmet: Literal["degrade", "raise"] = "degrade"
    cut_agreement: float | None = None
    cut_similarity: str = "conclusion"
    ttft_budget: float | None = None
    max_reference_chars: int | None = None
    prewarm: bool = True
    description: str = ""
    staircase: StaircaseConfig | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    api_keys_env: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    max_concurrent_streams: int = 1024
    shutdown_grace: float = 30.0
    request_timeout: float = 600.0
    ui: bool = True  # the playground page at / (moa_stream.server.playground)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 15.0
    max_connections: int = 1024
    reasoning_progress: tuple[str, ...] = ()

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Keys from the config plus the comma-separated ones in ``api_keys_env``."""
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",")]
        return tuple(k for k in keys if k)


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The in-process simulated upstream used by ``kind = "sim"`` providers. ``models`` is the
    ``[sim.models]`` table as written (see :mod:`moa_stream.sim`); empty means the default set."""

    seed: int = 0
    models: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    providers: Mapping[str, ProviderConfig]
    agents: Mapping[str, AgentConfig]
    moas: Mapping[str, MoAConfig]
    server: ServerConfig = field(default_factory=ServerConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    source: str = "<config>"


# ---------------------------------------------------------------------------------------------
# Checking a parsed TOML document. Each reader takes the path of the table it reads, so every
# error names the exact field.


class _Table:
    def __init__(self, data: Any, path: str, source: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError("must be a table", path=path, source=source)
        self.data: dict[str, Any] = data
        self.path = path
        self.source = source
        self.seen: set[str] = set()

    def err(self, key: str, message: str) -> ConfigError:
        if key not in self.data:
            # A missing field is often a misspelt one that is present.
            close = difflib.get_close_matches(key, [k for k in self.data if k != key], 1, 0.75)
            if close:
                message += f" (this table has {close[0]!r}: a misspelling of {key!r}?)"
        return ConfigError(
            message, path=f"{self.path}.{key}" if self.path else key, source=self.source
        )

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            raise self.err(key, f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.err(key, f"expected {_kind_name(kinds)}, got {type(value).__name__}")
        return value

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        if key not in self.data:
            self.seen.add(key)
            raise self.err(key, "is required")
        return self.get(key, kind)

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = cast(str, self.get(key, str, default))
        if value not in choices:
            raise self.err(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value

    def positive(self, key: str, kind: type, default: Any, *, allow_zero: bool = False) -> Any:
        value = self.get(key, kind, default)
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise self.err(key, "must be positive")
        return value

    def between(self, key: str, low: float, high: float) -> float | None:
        """An optional number in ``low..high``."""
        value: float | None = self.get(key, float)
        if value is not None and not low <= value <= high:
            raise self.err(key, f"must be between {low:g} and {high:g}")
        return value

    def names(self, key: str, default: Sequence[str] = ()) -> tuple[str, ...]:
        value = self.get(key, list, list(default))
        if not all(isinstance(v, str) for v in value):
            raise self.err(key, "must be a list of strings")
        return tuple(value)

    def sub(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(
            self.data.get(key, {}), f"{self.path}.{key}" if self.path else key, self.source
        )

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            # Every reader asks for each field it knows before calling done(), so `seen`
            # holds this table's known fields.
            close = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise self.err(unknown[0], f"unknown field{hint}")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _provider(t: _Table, name: str) -> ProviderConfig:
    kind = cast(
        Literal["openai", "sim", "anthropic", "litellm"], t.choice("kind", PROVIDER_KINDS, "openai")
    )
    base_url = t.get("base_url", str)
    if kind == "openai" and not base_url:
        raise t.err("base_url", "is required for an OpenAI-compatible provider")
    headers = t.get("headers", dict, {})
    if not all(isinstance(v, str) for v in headers.values()):
        raise t.err("headers", "values must be strings")
    tt = t.sub("timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        connect=tt.positive("connect", float, defaults.connect),
        first_token=tt.positive("first_token", float, defaults.first_token),
        idle=tt.positive("idle", float, defaults.idle),
        total=tt.positive("total", float, defaults.total),
    )
    tt.done()
    rt = t.sub("retry")
    rd = RetrySettings()
    retry = RetrySettings(
        max_attempts=rt.positive("max_attempts", int, rd.max_attempts),
        backoff_base=rt.positive("backoff_base", float, rd.backoff_base, allow_zero=True),
        backoff_cap=rt.positive("backoff_cap", float, rd.backoff_cap, allow_zero=True),
    )
    rt.done()
    default_methods = {
        "sim": ["turns", "prefill:vllm"],
        "anthropic": ["prefill:anthropic", "turns"],
    }.get(kind, ["turns"])
    methods: list[Continuation] = []
    for text in t.names("continuation", default_methods):
        try:
            methods.append(parse_continuation(text))
        except ValueError as exc:
            raise t.err("continuation", str(exc)) from None
    if len({m.method for m in methods}) != len(methods):
        raise t.err("continuation", "name each method (turns, prefill) at most once")
    config = ProviderConfig(
        name=name,
        kind=kind,
        base_url=base_url,
        api_key_env=t.get("api_key_env", str),
        api_key=t.get("api_key", str),
        headers=headers,
        max_tokens_field=cast(
            Literal["max_tokens", "max_completion_tokens"],
            t.choice("max_tokens_field", ("max_tokens", "max_completion_tokens"), "max_tokens"),
        ),
        max_connections=t.positive("max_connections", int, 100),
        timeouts=timeouts,
        retry=retry,
        continuation=tuple(methods),
    )
    t.done()
    return config


def _staircase(t: _Table) -> StaircaseConfig:
    d = StaircaseConfig()
    raw_steps = t.get("steps", (list, str), list(d.steps))
    try:
        steps = parse_steps(raw_steps)
    except ValueError as exc:
        raise t.err("steps", str(exc)) from None
    lead = t.get("lead", (int, bool), d.lead)
    if lead is False:
        lead = None
    elif lead is True or (lead is not None and lead < 0):
        raise t.err("lead", "must be a whole number >= 0, or false (never wait)")
    config = StaircaseConfig(
        steps=steps,
        lead=lead,
        give_up_after=t.positive("give_up_after", float, None, allow_zero=True),
        continuation=cast(
            Literal["auto", "prefill", "turns"],
            t.choice("continuation", ("auto", "prefill", "turns"), "auto"),
        ),
        max_steps=_whole_or_false(t, "max_steps", d.max_steps),
        max_rejects=_whole(t, "max_rejects", d.max_rejects, minimum=0),
        max_pause=t.positive("max_pause", float, d.max_pause),
        guard_words=_whole(t, "guard_words", d.guard_words, minimum=1),
        min_news=_whole(t, "min_news", d.min_news, minimum=0),
        context_window=_whole_or_false(t, "context_window", d.context_window),
        layout=cast(Literal["updates", "whole"], t.choice("layout", LAYOUTS, d.layout)),
        loop_restarts=_whole_or_false(t, "loop_restarts", d.loop_restarts),
        read_ahead=_whole(t, "read_ahead", d.read_ahead, minimum=0),
    )
    t.done()
    return config


def _whole(t: _Table, key: str, default: int, *, minimum: int) -> int:
    value = t.get(key, (int, bool), default)
    if isinstance(value, bool) or value < minimum:
        raise t.err(key, f"must be a whole number >= {minimum}")
    return cast(int, value)


def _whole_or_false(t: _Table, key: str, default: int | None) -> int | None:
    """A whole number >= 1, or ``false`` for no limit."""
    value = t.get(key, (int, bool), default)
    if value is False or value is None:
        return None
    if value is True or value < 1:
        raise t.err(key, "must be a whole number >= 1, or false (no limit)")
    return cast(int, value)


def _agent(t: _Table, name: str, providers: Mapping[str, ProviderConfig]) -> AgentConfig:
    provider = t.require("provider", str)
    if provider not in providers:
        raise t.err(
            "provider", f"unknown provider {provider!r} (known: {', '.join(providers) or 'none'})"
        )
    temperature = t.between("temperature", 0, 2)
    config = AgentConfig(
        name=name,
        provider=provider,
        model=t.require("model", str),
        temperature=temperature,
        max_tokens=t.positive("max_tokens", int, None),
        system_prompt=t.get("system_prompt", str),
        extra=t.get("extra", dict, {}),
    )
    t.done()
    return config


def _moa(t: _Table, moa_id: str, agents: Mapping[str, AgentConfig]) -> MoAConfig:
    def agent_ref(key: str, value: str) -> str:
        if value not in agents:
            raise t.err(key, f"unknown agent {value!r} (known: {', '.join(agents) or 'none'})")
        return value

    preset = cast(
        Literal["moa", "self_moa", "single"],
        t.choice("preset", ("moa", "self_moa", "single"), "moa"),
    )
    proposers = tuple(agent_ref("proposers", a) for a in t.names("proposers"))
    twice = sorted({a for a in proposers if proposers.count(a) > 1})
    if twice:
        # Results are keyed by agent name; use self_moa (or a second [agents] entry) for samples.
        raise t.err("proposers", f"lists {', '.join(map(repr, twice))} more than once")
    if preset in ("moa", "self_moa") and not proposers:
        raise t.err("proposers", f"a {preset} preset needs at least one proposer")
    policy_text = t.get("policy", str, "wait_all")
    try:
        policy = parse_policy(policy_text)
    except ConfigError as exc:
        raise t.err("policy", f"{exc} in {policy_text!r}") from None
    staircase = _staircase(t.sub("staircase")) if "staircase" in t.data else None
    if staircase is not None and preset == "single":
        raise t.err("staircase", "a single model has no references to refresh")
    similarity = t.choice("cut_similarity", tuple(SIMILARITIES), "conclusion")
    agreement = t.between("cut_agreement", 0, 1)
    config = MoAConfig(
        id=moa_id,
        preset=preset,
        proposers=proposers,
        aggregator=agent_ref("aggregator", t.require("aggregator", str)),
        fallbacks=tuple(agent_ref("fallbacks", a) for a in t.names("fallbacks")),
        layers=t.positive("layers", int, 1),
        samples=t.positive("samples", int, 4),
        policy=policy,
        stragglers=cast(
            Literal["cancel", "keep"], t.choice("stragglers", ("cancel", "keep"), "cancel")
        ),
        on_unmet=cast(
            Literal["degrade", "raise"], t.choice("on_unmet", ("degrade", "raise"), "degrade")
        ),
        cut_agreement=agreement,
        cut_similarity=similarity,
        ttft_budget=t.positive("ttft_budget", float, None),
        max_reference_chars=t.positive("max_reference_chars", int, None),
        prewarm=t.get("prewarm", bool, True),
        description=t.get("description", str, ""),
        staircase=staircase,
    )
    t.done()
    # The layer checks this too, but only when Runtime builds it: here the error still knows
    # its file and field.
    needed = required_completions(policy)
    has = {"moa": len(proposers), "self_moa": config.samples}.get(preset)
    if has is not None and needed > has:
        what = "samples" if preset == "self_moa" else "proposers"
        raise t.err(
            "policy", f"policy {policy!r} asks for {needed} proposers; the layer has {has} {what}"
        )
    return config


def _choose_continuation(
    wanted: str, provider: ProviderConfig, where: _Table, agent: str
) -> Continuation:
    """The continuation a staircase uses on ``provider``; a method it can't do is an error."""
    by_method = {c.method: c for c in provider.continuation}
    if wanted == "auto":
        return by_method.get("prefill") or by_method.get("turns") or Continuation("turns")
    chosen = next((c for c in provider.continuation if c.method == wanted), None)
    if chosen is None:
        can = ", ".join(str(c) for c in provider.continuation) or "none"
        raise where.err(
            "staircase",
            f"continuation {wanted!r} is not supported by provider {provider.name!r} of "
            f"aggregator {agent!r} (it supports: {can}; set providers.{provider.name}."
            "continuation)",
        )
    return chosen


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    port = t.get("port", int, d.port)
    if not 0 <= port <= 65535:
        raise t.err("port", "must be between 0 and 65535")
    config = ServerConfig(
        host=t.get("host", str, d.host),
        port=port,
        api_keys=t.names("api_keys"),
        api_keys_env=t.get("api_keys_env", str),
        cors_origins=t.names("cors_origins"),
        max_body_bytes=t.positive("max_body_bytes", int, d.max_body_bytes),
        max_concurrent_streams=t.positive("max_concurrent_streams", int, d.max_concurrent_streams),
        shutdown_grace=t.positive("shutdown_grace", float, d.shutdown_grace, allow_zero=True),
        request_timeout=t.positive("request_timeout", float, d.request_timeout),
        ui=t.get("ui", bool, d.ui),
        header_timeout=t.positive("header_timeout", float, d.header_timeout),
        body_timeout=t.positive("body_timeout", float, d.body_timeout),
        keepalive_timeout=t.positive("keepalive_timeout", float, d.keepalive_timeout),
        max_connections=t.positive("max_connections", int, d.max_connections),
        reasoning_progress=t.names("reasoning_progress"),
    )
    t.done()
    return config


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Check a parsed TOML document and build a :class:`Config`."""
    root = _Table(dict(data), "", source)
    providers = {
        name: _provider(_Table(v, f"providers.{name}", source), name)
        for name, v in root.get("providers", dict, {}).items()
    }
    agents = {
        name: _agent(_Table(v, f"agents.{name}", source), name, providers)
        for name, v in root.get("agents", dict, {}).items()
    }
    moas = {
        name: _moa(_Table(v, f"moa.{name}", source), name, agents)
        for name, v in root.get("moa", dict, {}).items()
    }
    if not moas:
        raise ConfigError("at least one [moa.<id>] table is required", path="moa", source=source)
    for name, m in moas.items():
        if m.staircase is None:
            continue
        where = _Table({}, f"moa.{name}", source)
        resolved = {
            a: _choose_continuation(
                m.staircase.continuation, providers[agents[a].provider], where, a
            )
            for a in (m.aggregator, *m.fallbacks)
        }
        moas[name] = replace(m, staircase=replace(m.staircase, resolved=resolved))
    server = _server(root.sub("server"))
    unknown = [m for m in server.reasoning_progress if m != "*" and m not in moas]
    if unknown:
        raise ConfigError(
            f"unknown MoA id {unknown[0]!r} (known: {', '.join(moas)})",
            path="server.reasoning_progress",
            source=source,
        )
    st = root.sub("sim")
    sim = SimConfig(seed=st.get("seed", int, 0), models=st.get("models", dict, {}))
    st.done()
    if sim.models:
        from moa_stream.sim import models_from_table

        models_from_table(sim.models, source=source)  # checked now, built by Runtime
    root.done()
    return Config(providers, agents, moas, server, sim, source)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a TOML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    return loads_config(text, source)


def loads_config(text: str, source: str = "<config>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    return parse_config(data, source)


def default_config() -> Config:
    """The embedded default: simulated agents, no API key, several MoA presets."""
    text = resources.files("moa_stream").joinpath("default.toml").read_text(encoding="utf-8")
    return loads_config(text, "<default config>")


# ---------------------------------------------------------------------------------------------


class Runtime(AsyncResource):
    """Live objects for a :class:`Config`: providers, agents and MoAs by id.

    ``async with Runtime(config) as rt: rt.moas["fast"]``. Starts the simulated upstream when a
    provider has ``kind = "sim"``; closes every provider (and the simulator) on exit.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, Provider] = {}
        self.agents: dict[str, Agent] = {}
        self.moas: dict[str, MoA] = {}
        self.sim: SimServer | None = None
        self._closed = False

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def start(self) -> None:
        config = self.config
        sim_url = ""
        if any(p.kind == "sim" for p in config.providers.values()):
            from moa_stream.sim import SimServer, models_from_table

            models = models_from_table(config.sim.models, source=config.source)
            self.sim = SimServer(models=models, seed=config.sim.seed)
            await self.sim.start()
            sim_url = self.sim.base_url
        for name, p in config.providers.items():
            base_url = sim_url if p.kind == "sim" else p.base_url
            if p.api_key_env and not (p.api_key or os.environ.get(p.api_key_env)):
                raise ConfigError(
                    f"environment variable {p.api_key_env} is not set",
                    path=f"providers.{name}.api_key_env",
                    source=config.source,
                )
            self.providers[name] = build_provider(
                p.kind,
                base_url,
                name=name,
                api_key=p.api_key,
                api_key_env=p.api_key_env,
                headers=p.headers,
                max_tokens_field=p.max_tokens_field,
                limit=p.max_connections,
                timeouts=p.timeouts,
                retry=p.retry,
                continuation=tuple(str(c) for c in p.continuation),
            )
        for name, a in config.agents.items():
            self.agents[name] = Agent(
                name,
                self.providers[a.provider],
                a.model,
                temperature=a.temperature,
                max_tokens=a.max_tokens,
                system_prompt=a.system_prompt,
                extra=a.extra,
            )
        for moa_id, m in config.moas.items():
            self.moas[moa_id] = build_moa(m, self.agents)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for provider in self.providers.values():
            await provider.aclose()
        if self.sim is not None:
            await self.sim.aclose()


def build_moa(m: MoAConfig, agents: Mapping[str, Agent]) -> MoA:
    """A :class:`MoA` from a checked :class:`MoAConfig` and live agents."""
    from moa_stream.engine.spec import self_moa

    aggregator = agents[m.aggregator]
    fallbacks = tuple(agents[a] for a in m.fallbacks)
    cut = LayerCut(
        agreement=m.cut_agreement,
        similarity=SIMILARITIES[m.cut_similarity],
        ttft_budget=m.ttft_budget,
    )
    if m.preset == "single":
        layers: tuple[Layer, ...] = ()
    elif m.preset == "self_moa":
        layers = self_moa(agents[m.proposers[0]], m.samples, policy=m.policy).layers
        layers = tuple(Layer(layer.agents, m.policy, m.stragglers, m.on_unmet) for layer in layers)
    else:
        layer = Layer(tuple(agents[a] for a in m.proposers), m.policy, m.stragglers, m.on_unmet)
        layers = (layer,) * m.layers
    staircase = None
    if m.staircase is not None:
        sc = m.staircase
        settings = {name: getattr(sc, name) for name in _STAIRCASE_SETTINGS}
        staircase = Staircase(**settings, continuation=dict(sc.resolved))
    return MoA(
        layers=layers,
        aggregator=aggregator,
        fallbacks=fallbacks,
        cut=cut,
        templates=PromptTemplates(),
        max_reference_chars=m.max_reference_chars,
        prewarm=m.prewarm,
        name=m.id,
        staircase=staircase,
    )
