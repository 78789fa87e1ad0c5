"""Simulated models from TOML: the ``[sim]`` table of a config file, or a file of its own.

::

    seed = 0                     # --seed overrides it
    include_defaults = true      # keep default_models() next to the ones below

    [models.fast]                # a new model: a profile, or explicit numbers
    profile = "small-fast"
    accuracy = 0.6
    faults = { rate_limit = 0.05, stall_mid = 0.02, stall_s = 5 }

    [models.custom]
    ttft_p50 = 0.3
    ttft_p95 = 0.9
    tokens_per_s = 120
    slots = 4

    [models.medium]              # a default model's name: change only what is listed
    accuracy = 0.9

    [models.llama]               # continues a trailing assistant message and echoes it
    profile = "medium"
    continue_trailing_assistant = true
    echo_prefill = true
    context_window = 8192        # longer prompts get an overflow error in the overflow style
    overflow = "llama-server"
    continuation = "small"       # restarts, early stops, copied markup (or "strong", "perfect")

    [models.claude]
    profile = "large-slow"
    cache_min_prefix = 1024      # shorter cached prefixes are not reported cached
    continuation = { profile = "strong", refuse_prefill = 1.0 }

The same keys work in the ``[sim]`` table of a ``moa-stream`` config file (``[sim.models.fast]``);
a file with a ``[sim]`` table is read from that table. ``models`` may also be an array of tables
with a ``name`` key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from moa_stream._exceptions import ConfigError
from moa_stream.sim.profiles import (
    CONTINUATION_PROFILES,
    PROFILES,
    ContinuationProfile,
    FaultProfile,
    LatencyProfile,
    SimModel,
    default_models,
)

__all__ = ["SimSettings", "load_sim_config", "models_from_table"]

_LATENCY_KEYS = frozenset(f.name for f in fields(LatencyProfile))
_FAULT_KEYS = frozenset(f.name for f in fields(FaultProfile))
_CONTINUATION_KEYS = frozenset(f.name for f in fields(ContinuationProfile))
_FLOAT_KEYS = frozenset(
    {
        "ttft",
        "time_scale",
        "answer_tokens_sigma",
        "accuracy",
        *_LATENCY_KEYS,
        *_FAULT_KEYS,
        *_CONTINUATION_KEYS,
    }
)
_INT_KEYS = frozenset(
    {"answer_tokens", "max_answer_tokens", "slots", "context_window", "cache_min_prefix"}
)
_STR_KEYS = frozenset({"name", "profile", "answer_at", "owned_by", "overflow"})
_BOOL_KEYS = frozenset(
    {"continue_trailing_assistant", "echo_prefill", "prefix_cache", "sends_usage"}
)
_TABLE_KEYS = frozenset({"faults", "continuation"})
_MODEL_KEYS = (
    (_FLOAT_KEYS - _FAULT_KEYS - _CONTINUATION_KEYS)
    | _INT_KEYS
    | _STR_KEYS
    | _BOOL_KEYS
    | _TABLE_KEYS
)
_SIM_MODEL_FIELDS = frozenset(f.name for f in fields(SimModel))


@dataclass(frozen=True, slots=True)
class SimSettings:
    """A simulator configuration: the models to host and the seed, if the file sets one."""

    models: list[SimModel]
    seed: int | None = None


def _typed(value: object, key: str, path: str, source: str | None) -> Any:
    where = f"{path}.{key}"
    if key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError("must be a number", path=where, source=source)
        return float(value)
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("must be an integer", path=where, source=source)
        return value
    if key in _BOOL_KEYS:
        if not isinstance(value, bool):
            raise ConfigError("must be true or false", path=where, source=source)
        return value
    if not isinstance(value, str):
        raise ConfigError("must be a string", path=where, source=source)
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(
    table: Mapping[str, Any], allowed: frozenset[str], path: str, src: str | None
) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"unknown key {key!r}", path=_join(path, key), source=src)


def _relocated(exc: ConfigError, path: str, source: str | None) -> ConfigError:
    """``exc`` (raised by a value type, naming only its field) re-raised at ``path``."""
    message = str(exc)
    field_name = None
    if exc.path:
        message = message.removeprefix(f"{exc.path}: ")
        field_name = exc.path.rsplit(".", 1)[-1]
    return ConfigError(message, path=_join(path, field_name) if field_name else path, source=source)


def _model(
    name: str, table: Mapping[str, Any], base: SimModel | None, path: str, source: str | None
) -> SimModel:
    _check_keys(table, _MODEL_KEYS, path, source)
    values = {k: _typed(v, k, path, source) for k, v in table.items() if k not in _TABLE_KEYS}

    latency: LatencyProfile | None = base.latency if base is not None else None
    if "profile" in values:
        profile = values["profile"]
        if profile not in PROFILES:
            raise ConfigError(
                f"unknown profile {profile!r} (known: {', '.join(PROFILES)})",
                path=f"{path}.profile",
                source=source,
            )
        latency = PROFILES[profile]
    overrides = {k: values[k] for k in _LATENCY_KEYS if k in values}
    if "ttft" in values:
        overrides["ttft_p50"] = values["ttft"]
        overrides["ttft_p95"] = None
    if latency is None and ("ttft_p50" not in overrides or "tokens_per_s" not in overrides):
        raise ConfigError(
            "give a profile, or ttft_p50 (or ttft) and tokens_per_s", path=path, source=source
        )
    try:
        latency = LatencyProfile(**overrides) if latency is None else replace(latency, **overrides)
        if "time_scale" in values:
            latency = latency.scaled(values["time_scale"])
    except ConfigError as exc:
        raise _relocated(exc, path, source) from None

    faults = base.faults if base is not None else FaultProfile()
    raw_faults = table.get("faults")
    if raw_faults is not None:
        where = f"{path}.faults"
        if not isinstance(raw_faults, Mapping):
            raise ConfigError("must be a table", path=where, source=source)
        _check_keys(raw_faults, _FAULT_KEYS, where, source)
        typed = {k: _typed(v, k, where, source) for k, v in raw_faults.items()}
        try:
            faults = replace(faults, **typed)
        except ConfigError as exc:
            raise _relocated(exc, where, source) from None

    continuation = base.continuation if base is not None else CONTINUATION_PROFILES["perfect"]
    if "continuation" in table:
        continuation = _continuation(table["continuation"], continuation, path, source)

    model_fields = {k: v for k, v in values.items() if k in _SIM_MODEL_FIELDS}
    model_fields.update(name=name, latency=latency, faults=faults, continuation=continuation)
    try:
        return replace(base, **model_fields) if base is not None else SimModel(**model_fields)
    except ConfigError as exc:
        raise _relocated(exc, path, source) from None


def _continuation(
    raw: object, base: ContinuationProfile, path: str, source: str | None
) -> ContinuationProfile:
    """A model's ``continuation``: a built-in profile's name, or a table of probabilities that
    change the model's current profile (or, with ``profile``, a built-in one)."""
    where = f"{path}.continuation"
    known = ", ".join(CONTINUATION_PROFILES)

    def named(value: object, at: str) -> ContinuationProfile:
        if not isinstance(value, str) or value not in CONTINUATION_PROFILES:
            raise ConfigError(f"must be a continuation profile ({known})", path=at, source=source)
        return CONTINUATION_PROFILES[value]

    if isinstance(raw, str):
        return named(raw, where)
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"must be a continuation profile ({known}) or a table", path=where, source=source
        )
    _check_keys(raw, _CONTINUATION_KEYS | {"profile"}, where, source)
    if "profile" in raw:
        base = named(raw["profile"], f"{where}.profile")
    typed = {k: _typed(v, k, where, source) for k, v in raw.items() if k != "profile"}
    try:
        return replace(base, **typed)
    except ConfigError as exc:
        raise _relocated(exc, where, source) from None


def models_from_table(
    table: Mapping[str, Any] | list[Any],
    *,
    include_defaults: bool = True,
    source: str | None = None,
    path: str = "sim.models",
) -> list[SimModel]:
    """Simulated models from a ``models`` table (name -> settings) or an array of tables with
    ``name``; see the module docstring for the keys.

    With ``include_defaults`` (the default), :func:`~moa_stream.sim.profiles.default_models` are
    kept: an entry named like one of them changes only the keys it lists, other entries are
    added. An empty table gives the default set. Raises :class:`~moa_stream.ConfigError`.
    """
    entries: list[tuple[str, Mapping[str, Any], str]] = []
    if isinstance(table, list):
        for i, item in enumerate(table):
            where = f"{path}[{i}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise ConfigError("must be a table with a string 'name'", path=where, source=source)
            entries.append((item["name"], item, where))
    elif isinstance(table, Mapping):
        for name, item in table.items():
            where = f"{path}.{name}"
            if not isinstance(item, Mapping):
                raise ConfigError("must be a table", path=where, source=source)
            entries.append((name, item, where))
    else:
        raise ConfigError("must be a table", path=path, source=source)

    models: dict[str, SimModel] = {}
    if include_defaults:
        models = {m.name: m for m in default_models()}
    seen: set[str] = set()
    for name, item, where in entries:
        if name in seen:
            raise ConfigError(f"duplicate model name {name!r}", path=where, source=source)
        seen.add(name)
        settings = {k: v for k, v in item.items() if k != "name"}
        models[name] = _model(name, settings, models.get(name), where, source)
    return list(models.values())


def load_sim_config(path: str | os.PathLike[str]) -> SimSettings:
    """Read a simulator TOML file (or the ``[sim]`` table of a ``moa-stream`` config file)."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=source) from None
    prefix = ""
    table: Any = data
    if isinstance(data.get("sim"), Mapping):
        table, prefix = data["sim"], "sim."
    else:
        _check_keys(data, frozenset({"seed", "include_defaults", "models"}), "", source)
    seed = table.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError("must be an integer", path=f"{prefix}seed", source=source)
    include_defaults = table.get("include_defaults", True)
    if not isinstance(include_defaults, bool):
        raise ConfigError("must be true or false", path=f"{prefix}include_defaults", source=source)
    models = models_from_table(
        table.get("models", {}),
        include_defaults=include_defaults,
        source=source,
        path=f"{prefix}models",
    )
    if not models:
        raise ConfigError("no models to serve", path=f"{prefix}models", source=source)
    return SimSettings(models=models, seed=seed)
