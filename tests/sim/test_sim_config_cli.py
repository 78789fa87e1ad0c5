"""Simulated models from TOML, and the ``moa-stream sim`` command."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from moa_stream import ConfigError
from moa_stream.sim import (
    PROFILES,
    FaultProfile,
    default_models,
    load_sim_config,
    models_from_table,
)


def test_an_empty_table_gives_the_default_models() -> None:
    assert models_from_table({}) == default_models()


def test_entries_change_defaults_and_add_models() -> None:
    models = {
        m.name: m
        for m in models_from_table(
            {
                "medium": {"accuracy": 0.9},
                "fast": {"profile": "small-fast", "faults": {"rate_limit": 0.1, "stall_s": 2}},
                "custom": {"ttft_p50": 0.3, "ttft_p95": 0.9, "tokens_per_s": 120, "slots": 4},
                "fixed": {"ttft": 0.05, "tokens_per_s": 1000, "answer_at": "start"},
                "quick": {"profile": "large-slow", "time_scale": 0.1},
            }
        )
    }
    defaults = {m.name: m for m in default_models()}
    assert set(models) == set(defaults) | {"fast", "custom", "fixed", "quick"}
    assert models["medium"].accuracy == 0.9
    assert models["medium"].latency == defaults["medium"].latency
    assert models["fast"].latency == PROFILES["small-fast"]
    assert models["fast"].faults == FaultProfile(rate_limit=0.1, stall_s=2.0)
    assert models["custom"].latency.ttft_p95 == 0.9
    assert models["custom"].slots == 4
    assert models["fixed"].latency.ttft_sigma == 0.0
    assert models["fixed"].answer_at == "start"
    assert models["quick"].latency.ttft_p50 == pytest.approx(PROFILES["large-slow"].ttft_p50 / 10)


def test_array_form_without_defaults() -> None:
    models = models_from_table(
        [{"name": "a", "profile": "medium"}, {"name": "b", "profile": "heavy-tail"}],
        include_defaults=False,
    )
    assert [m.name for m in models] == ["a", "b"]


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({"x": {"profile": "nope"}}, "sim.models.x.profile"),
        ({"x": {"profile": "medium", "colour": 1}}, "sim.models.x.colour"),
        ({"x": {"profile": "medium", "accuracy": "high"}}, "sim.models.x.accuracy"),
        ({"x": {"profile": "medium", "accuracy": 2}}, "sim.models.x.accuracy"),
        ({"x": {"tokens_per_s": 10}}, "sim.models.x"),
        ({"x": {"profile": "medium", "faults": {"boom": 1}}}, "sim.models.x.faults.boom"),
        (
            {"x": {"profile": "medium", "faults": {"rate_limit": 3}}},
            "sim.models.x.faults.rate_limit",
        ),
        ({"x": {"ttft_p50": 1, "ttft_p95": 0.5, "tokens_per_s": 5}}, "sim.models.x.ttft_p95"),
        ({"x": 5}, "sim.models.x"),
    ],
)
def test_bad_entries_are_config_errors_naming_the_field(
    table: dict[str, object], path: str
) -> None:
    with pytest.raises(ConfigError) as info:
        models_from_table(table, source="f.toml")
    assert info.value.path == path
    assert info.value.source == "f.toml"


def test_load_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        'seed = 5\ninclude_defaults = false\n[models.a]\nprofile = "medium"\naccuracy = 0.4\n'
    )
    settings = load_sim_config(path)
    assert settings.seed == 5
    assert [(m.name, m.accuracy) for m in settings.models] == [("a", 0.4)]


def test_load_the_sim_table_of_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "moa.toml"
    path.write_text(
        '[providers.x]\nkind = "sim"\n'
        "[sim]\nseed = 3\n[sim.models.a]\nttft = 0.1\ntokens_per_s = 50\n"
    )
    settings = load_sim_config(path)
    assert settings.seed == 3
    assert "a" in {m.name for m in settings.models}


@pytest.mark.parametrize(
    ("text", "path"),
    [("seed = [", None), ("seed = 'x'", "seed"), ("colour = 1", "colour")],
)
def test_bad_files_are_config_errors(tmp_path: Path, text: str, path: str | None) -> None:
    file = tmp_path / "bad.toml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sim_config(file)
    assert info.value.path == path
    assert info.value.source == str(file)


def test_the_sim_command_is_registered() -> None:
    from moa_stream.cli import COMMANDS

    assert COMMANDS["sim"] == "moa_stream.sim._cli"


# The real entry point, as ``moa-stream sim ...`` runs it.
_CLI = [sys.executable, "-m", "moa_stream.cli", "sim"]


async def test_sim_command_serves_until_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text(
        "include_defaults = false\n[models.cli-model]\nttft = 0.01\ntokens_per_s = 1000\n"
    )
    proc = await asyncio.create_subprocess_exec(
        *_CLI,
        "--port",
        "0",
        "--config",
        str(config),
        "--seed",
        "3",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        match = re.search(r"(http://\S+/v1)", line)
        assert match, line
        async with (
            aiohttp.ClientSession() as session,
            session.get(match.group(1) + "/models") as resp,
        ):
            data = orjson.loads(await resp.read())
        assert [m["id"] for m in data["data"]] == ["cli-model"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_sim_command_reports_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text("[models.x]\nprofile = 'nope'\n")
    proc = await asyncio.create_subprocess_exec(
        *_CLI,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert b"models.x.profile" in err
