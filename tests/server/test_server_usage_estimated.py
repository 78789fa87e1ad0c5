"""Usage that is partly this package's estimate is marked beside OpenAI's usage object."""

from __future__ import annotations

import aiohttp
from support.requests import CHAT, body
from support.server import CONFIG, agent_moas, serving, stream

from moa_stream.config import loads_config
from moa_stream.sim import SimModel

# A proposer whose upstream sends no usage (as llama-cpp-python's server does); the model is
# added to the simulator once it runs.
QUIET = agent_moas("quiet", "sim", "quiet")

USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_usage_marks_estimates_in_the_extension_only(
    session: aiohttp.ClientSession,
) -> None:
    async with serving(loads_config(CONFIG + QUIET, "<test config>")) as srv:
        srv.sim.add_model(SimModel("quiet", answer_tokens=8, sends_usage=False))
        options = {"stream_options": {"include_usage": True}}

        sse = await stream(session, srv.url, body("quiet-proposer", **options))
        assert sse.status == 200
        (usage_chunk,) = [c for c in sse.chunks if c.get("usage")]
        assert set(usage_chunk["usage"]) == USAGE_KEYS, "the usage object stays standard"
        assert usage_chunk["moa_stream"] == {"usage_estimated": True}

        async with session.post(srv.url + CHAT, json=body("quiet-proposer")) as resp:
            assert resp.status == 200
            data = await resp.json()
        assert set(data["usage"]) == USAGE_KEYS
        assert data["moa_stream"] == {"usage_estimated": True}

        # Every upstream counted: no mark at all.
        sse = await stream(session, srv.url, body("fast", **options))
        (usage_chunk,) = [c for c in sse.chunks if c.get("usage")]
        assert "moa_stream" not in usage_chunk
        async with session.post(srv.url + CHAT, json=body("fast")) as resp:
            data = await resp.json()
        assert "moa_stream" not in data
