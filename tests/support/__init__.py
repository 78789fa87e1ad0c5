"""What the test suite shares: request bodies, one SSE reader, test servers, timing probes.

Imported as ``tests.support.<module>`` (``pythonpath = ["."]`` in pytest's settings); the
fixtures built on it live in ``tests/conftest.py``.
"""
