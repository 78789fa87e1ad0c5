"""The child process of :class:`~moa_stream.bench._simhost.ProcessSimHost`.

Run as ``python -m moa_stream.bench._simchild [--asyncio] [--cpu N]``. It lives apart from
``_simhost`` so that running it as ``__main__`` does not import a module the package has
imported already.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import structlog

from moa_stream import _aio
from moa_stream.bench._simhost import child_serve


def main(argv: Sequence[str]) -> None:
    if "--cpu" in argv:
        # Pinned, so that the simulator and the measured client never share a core.
        cpu = int(argv[argv.index("--cpu") + 1])
        os.sched_setaffinity(0, {cpu})
    # This process is the simulator only: its log lines would interleave with the parent's
    # progress display.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    _aio.run(child_serve(), use_uvloop="--asyncio" not in argv)


if __name__ == "__main__":
    main(sys.argv[1:])
