"""Provider kinds in the configuration: ``anthropic`` and ``litellm`` build their providers,
providers say how their answers can be continued, and the Anthropic kind streams from the
simulator's
Messages route, for a MoA too."""

from __future__ import annotations

import pytest

from moa_stream import ChatRequest, ConfigError
from moa_stream.config import Runtime, loads_config
from moa_stream.providers import AnthropicProvider, OpenAIProvider
from moa_stream.sim import LatencyProfile, SimModel, SimServer

AGENTS = """
[agents.a]
provider = "claude"
model = "m"

[moa.one]
proposers = ["a"]
aggregator = "a"
"""


async def test_anthropic_kind_streams_from_the_simulators_messages_route() -> None:
    model = SimModel(name="m", latency=LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000))
    async with SimServer(models=[model]) as sim:
        config = loads_config(
            f"""
[providers.claude]
kind = "anthropic"
base_url = "{sim.url}"

[providers.local]
base_url = "{sim.base_url}"
{AGENTS}""",
            "test.toml",
        )
        async with Runtime(config) as runtime:
            claude = runtime.providers["claude"]
            local = runtime.providers["local"]
            assert isinstance(claude, AnthropicProvider)
            assert isinstance(local, OpenAIProvider)
            assert claude.continuation == ("prefill:anthropic", "turns")
            assert local.continuation == ("turns",)
            req = ChatRequest([{"role": "user", "content": "Hi"}], "m")
            async with claude.stream(req) as stream:
                text = "".join([d.content async for d in stream])
            async with runtime.moas["one"].stream([{"role": "user", "content": "Hi"}]) as run:
                result = await run.final()
    assert len(text.split()) == 64
    assert result.text
    assert [r.outcome for r in sim.records] == ["complete"] * 3


def test_kind_is_checked_and_continuation_notation_too() -> None:
    with pytest.raises(ConfigError, match="continuation"):
        OpenAIProvider("http://h/v1", continuation=("rewrite",))
    with pytest.raises(ConfigError, match="continuation"):
        OpenAIProvider("http://h/v1", continuation=("prefill",))
    assert OpenAIProvider("http://h/v1", continuation=["turns", "prefill:llama"]).continuation == (
        "turns",
        "prefill:llama",
    )
    with pytest.raises(ConfigError, match=r"providers\.claude\.kind"):
        loads_config(f'[providers.claude]\nkind = "bedrock"\n{AGENTS}', "t.toml")
    config = loads_config(f'[providers.claude]\nkind = "anthropic"\n{AGENTS}', "t.toml")
    assert config.providers["claude"].base_url is None


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
async def test_litellm_kind() -> None:
    pytest.importorskip("litellm", reason="the litellm extra is not installed")
    from moa_stream.providers import LiteLLMProvider

    config = loads_config(
        f'[providers.claude]\nkind = "litellm"\nbase_url = "http://127.0.0.1:9/v1"\n{AGENTS}',
        "t.toml",
    )
    async with Runtime(config) as runtime:
        provider = runtime.providers["claude"]
        assert isinstance(provider, LiteLLMProvider)
        assert provider.continuation == ("turns",)
