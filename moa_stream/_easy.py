"""The short way to a MoA: endpoints in, an object that owns its providers out.

::

    async with moa_stream.MoA.from_endpoints(
        ["small-fast", "medium", "large-slow"], "aggregator", base_url="http://127.0.0.1:8001/v1"
    ) as m:
        async for text in m.text(messages, policy="quorum(2)"):
            print(text, end="")

:func:`from_endpoints` builds one :class:`~moa_stream.OpenAIProvider` per distinct endpoint,
an :class:`~moa_stream.Agent` per model and the :class:`~moa_stream.MoA`; the returned
:class:`EndpointMoA` closes the providers (and any run still open) when its ``async with``
block ends. The explicit forms (providers, ``Agent``, :func:`~moa_stream.mixture_of_agents`,
``spec.stream()``) stay available for everything this does not cover.

This is the package's convenience layer, above the engine: the engine builds the MoA
(:meth:`MoA.from_endpoints <moa_stream.MoA.from_endpoints>`, with the pieces of
:mod:`moa_stream.engine.endpoints`) and never imports this module.
"""

from __future__ import annotations

from moa_stream.engine.endpoints import Endpoint, EndpointMoA, as_policy
from moa_stream.engine.spec import MoA

__all__ = ["Endpoint", "EndpointMoA", "as_policy", "from_endpoints"]

#: ``moa_stream.from_endpoints(...)`` is ``MoA.from_endpoints(...)``: the same arguments, the
#: same :class:`EndpointMoA`.
from_endpoints = MoA.from_endpoints
