"""Config: the embedded default loads, and every mistake is a ConfigError naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa_stream import ConfigError
from moa_stream.config import build_moa, default_config, load_config, loads_config
from moa_stream.engine import Quorum
from moa_stream.testing import ScriptedProvider

BASE = """
[providers.local]
base_url = "http://127.0.0.1:9/v1"

[agents.a]
provider = "local"
model = "m-a"

[agents.b]
provider = "local"
model = "m-b"
"""


def config_with(extra: str):
    return loads_config(BASE + extra, "test.toml")


def test_default_config_defines_simulated_moas() -> None:
    config = default_config()
    assert {"moa-quorum", "moa-wait-all", "moa-partial", "self-moa", "single"} <= set(config.moas)
    assert all(p.kind == "sim" for p in config.providers.values())
    assert config.moas["moa-quorum"].policy == parse("quorum(2) | deadline(2.0)")


def parse(text: str):
    from moa_stream.engine import parse_policy

    return parse_policy(text)


def test_a_full_moa_table_is_read() -> None:
    config = config_with(
        """
[moa.fast]
proposers = ["a", "b"]
aggregator = "a"
fallbacks = ["b"]
layers = 2
policy = "quorum(1)"
stragglers = "keep"
cut_agreement = 0.8
ttft_budget = 3
max_reference_chars = 2000
"""
    )
    m = config.moas["fast"]
    assert m.proposers == ("a", "b") and m.fallbacks == ("b",)
    assert m.policy == Quorum(1) and m.layers == 2 and m.stragglers == "keep"
    assert m.ttft_budget == 3.0 and m.cut_agreement == 0.8


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        ('[moa.x]\nproposers = ["a"]\n', "moa.x.aggregator", "is required"),
        (
            '[moa.x]\nproposers = ["zz"]\naggregator = "a"\n',
            "moa.x.proposers",
            "unknown agent 'zz'",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\npolicy = "quorum(0)"\n',
            "moa.x.policy",
            "k >= 1",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nlayers = "2"\n',
            "moa.x.layers",
            "expected an integer",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nlayers = 0\n',
            "moa.x.layers",
            "must be positive",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nbogus = 1\n',
            "moa.x.bogus",
            "unknown field",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nstragglers = "wait"\n',
            "moa.x.stragglers",
            "must be one of",
        ),
        ('[moa.x]\naggregator = "a"\n', "moa.x.proposers", "needs at least one proposer"),
        (
            '[moa.x]\npreset = "single"\naggregator = "a"\n'
            '[agents.c]\nprovider = "nope"\nmodel = "m"\n',
            "agents.c.provider",
            "unknown provider 'nope'",
        ),
        (
            '[moa.x]\npreset = "single"\naggregator = "a"\n[server]\nport = 70000\n',
            "server.port",
            "between 0 and 65535",
        ),
        (
            '[moa.x]\npreset = "single"\naggregator = "a"\n[providers.local.timeouts]\nidle = -1\n',
            "providers.local.timeouts.idle",
            "must be positive",
        ),
        ("", "moa", "at least one"),
    ],
)
def test_mistakes_name_the_field_and_the_file(extra: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(extra)
    assert info.value.path == path
    assert info.value.source == "test.toml"
    assert message in str(info.value)
    assert str(info.value).startswith(f"test.toml: {path}: ")


def test_invalid_toml_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        loads_config("[moa\n", "bad.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_presets_build_the_right_shapes() -> None:
    config = config_with(
        """
[moa.m]
proposers = ["a", "b"]
aggregator = "a"
layers = 2
[moa.s]
preset = "self_moa"
proposers = ["b"]
samples = 3
aggregator = "a"
[moa.one]
preset = "single"
aggregator = "b"
"""
    )
    from moa_stream.engine import Agent

    p = ScriptedProvider({})
    agents = {name: Agent(name, p, c.model) for name, c in config.agents.items()}
    m = build_moa(config.moas["m"], agents)
    assert len(m.layers) == 2 and [a.name for a in m.layers[0].agents] == ["a", "b"]
    s = build_moa(config.moas["s"], agents)
    assert [a.model for a in s.layers[0].agents] == ["m-b"] * 3
    assert len({a.extra["seed"] for a in s.layers[0].agents}) == 3
    one = build_moa(config.moas["one"], agents)
    assert one.layers == () and one.aggregator.model == "m-b"


def test_server_api_keys_come_from_config_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYS", "k2, k3,")
    config = config_with(
        '[moa.x]\npreset = "single"\naggregator = "a"\n'
        '[server]\napi_keys = ["k1"]\napi_keys_env = "KEYS"\n'
    )
    assert config.server.resolved_api_keys() == ("k1", "k2", "k3")
    assert "k1" not in repr(config.server)


def test_a_staircase_table_builds_a_staircase_with_each_providers_continuation() -> None:
    from moa_stream.engine.staircase import Continuation

    extra = (
        '[providers.vllm]\nbase_url = "http://127.0.0.1:9/v1"\n'
        'continuation = ["turns", "prefill:vllm"]\n'
        '[agents.c]\nprovider = "vllm"\nmodel = "m-c"\n'
        '[moa.x]\nproposers = ["a", "b"]\naggregator = "c"\nfallbacks = ["a"]\n'
        'policy = "partial(2, min_tokens=8)"\n'
        'staircase = { steps = "8, 16, 32", lead = false, give_up_after = 5, layout = "whole",'
        " loop_restarts = false, read_ahead = 0 }\n"
    )
    config = config_with(extra)
    sc = config.moas["x"].staircase
    assert sc is not None and sc.steps == (8, 16, 32) and sc.lead is None
    # auto: prefill where the provider can, appended turns elsewhere
    assert sc.resolved == {"c": Continuation("prefill", "vllm"), "a": Continuation("turns")}
    agents = {name: _agent(name) for name in ("a", "b", "c")}
    built = build_moa(config.moas["x"], agents)
    assert built.staircase is not None
    assert built.staircase.for_agent("c") == Continuation("prefill", "vllm")
    assert built.staircase.give_up_after == 5.0
    assert built.staircase.layout == "whole" and built.staircase.loop_restarts is None
    assert built.staircase.read_ahead == 0


def _agent(name: str):
    from moa_stream.engine import Agent

    return Agent(name, ScriptedProvider([]), name)


def test_the_default_config_ships_a_staircase_preset() -> None:
    staircase = default_config().moas["staircase"]
    assert staircase.staircase is not None
    assert staircase.staircase.resolved["aggregator"].method == "prefill"


@pytest.mark.parametrize(
    ("extra", "path", "message"),
    [
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\n'
            'staircase = { continuation = "prefill" }\n',
            "moa.x.staircase",
            "continuation 'prefill' is not supported by provider 'local'",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nstaircase = { steps = [8, 0] }\n',
            "moa.x.staircase.steps",
            "every step must be",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\nstaircase = { lead = -1 }\n',
            "moa.x.staircase.lead",
            "must be a whole number",
        ),
        (
            '[moa.x]\npreset = "single"\naggregator = "a"\nstaircase = {}\n',
            "moa.x.staircase",
            "no references",
        ),
        (
            '[moa.x]\npreset = "single"\naggregator = "a"\n'
            '[providers.other]\nbase_url = "http://x/v1"\ncontinuation = ["prefill:gpt"]\n',
            "providers.other.continuation",
            "unknown prefill flavour",
        ),
    ],
)
def test_staircase_mistakes_name_the_field(extra: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(extra)
    assert info.value.path == path
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("extra", "path", "suggestion"),
    [
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\npolcy = "wait_all"\n',
            "moa.x.polcy",
            "policy",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\n[server]\nprot = 1\n',
            "server.prot",
            "port",
        ),
        (
            '[moa.x]\nproposers = ["a"]\naggregator = "a"\n[agent.c]\nmodel = "m"\n',
            "agent",
            "agents",
        ),
    ],
)
def test_an_unknown_field_names_the_field_it_probably_meant(
    extra: str, path: str, suggestion: str
) -> None:
    with pytest.raises(ConfigError) as info:
        config_with(extra)
    assert info.value.path == path
    assert f"did you mean {suggestion!r}?" in str(info.value)


def test_an_unknown_field_unlike_any_other_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as info:
        config_with('[moa.x]\nproposers = ["a"]\naggregator = "a"\nzzzzzz = 1\n')
    assert "unknown field" in str(info.value)
    assert "did you mean" not in str(info.value)


def test_a_missing_field_points_at_its_misspelling() -> None:
    with pytest.raises(ConfigError) as info:
        config_with('[moa.x]\nproposer = ["a"]\naggregator = "a"\n')
    assert info.value.path == "moa.x.proposers"
    assert "'proposer': a misspelling of 'proposers'?" in str(info.value)
