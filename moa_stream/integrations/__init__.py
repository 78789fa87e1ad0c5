"""The MoA endpoints inside an application you already have.

- :mod:`moa_stream.integrations.fastapi`: a FastAPI router and an SSE response (extra
  ``fastapi``).
- :mod:`moa_stream.integrations.aiohttp`: the server as an aiohttp sub-application, and an SSE
  response helper.

Both speak the server's wire format (:mod:`moa_stream.server.wire`) and cancel a run when its
client disconnects. Nothing is imported here, so that importing one does not need the other's
framework. See ``docs/integrations.md``.
"""
