"""What the test suite shares: request bodies, one SSE reader, test servers, timing probes.

Imported as ``support.<module>`` (pytest's ``pythonpath = ["tests"]``); the fixtures built on
it (``session``, ``sim``, ``app_server``) live in ``tests/conftest.py``.

- ``requests``: ``body()`` and ``CHAT``; ``sse``: the SSE reader; ``http``: ``serve_app``;
  ``timing``: ``LoopLag``.
- Per area: ``sim``, ``server``, ``serve_process``, ``providers`` (a scripted upstream),
  ``integrations``, ``asgi``, ``bench``, ``terminal`` (a pty driver), ``ui``.
"""
