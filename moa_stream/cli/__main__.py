"""``python -m moa_stream.cli``: the ``moa-stream`` command without its console script (the
server's worker processes are started this way)."""

import sys

from moa_stream.cli import main

sys.exit(main())
