"""The ``moa-stream`` command.

Each sub-command lives next to the code it drives and registers itself through a module-level
``add_parser(subparsers)`` that sets ``func`` (``args -> exit code``) on its parser.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import cast

__all__ = ["main"]

#: sub-command name -> module that defines ``add_parser``
COMMANDS: dict[str, str] = {
    "demo": "moa_stream._demo",
    "chat": "moa_stream._demo",
    "sim": "moa_stream.sim._cli",
    "serve": "moa_stream.server._cli",
    "bench": "moa_stream.bench._cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa-stream",
        description="Mixture-of-Agents over OpenAI-compatible providers, streamed with low TTFT.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(COMMANDS.values()):
        module = importlib.import_module(module_name)
        add = cast(
            "Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]",
            module.add_parser,
        )
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
