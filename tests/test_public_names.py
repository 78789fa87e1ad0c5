"""Names a user reaches for are importable from the package itself, and importing it loads no
optional extra."""

from __future__ import annotations

import subprocess
import sys

import moa_stream
from moa_stream.engine import Hedge, Hedged, HedgeInfo, UsableAnswer
from moa_stream.providers import AnthropicProvider, LiteLLMProvider


def test_hedging_answers_and_providers_are_top_level() -> None:
    expected = {
        "Hedge": Hedge,
        "Hedged": Hedged,
        "HedgeInfo": HedgeInfo,
        "UsableAnswer": UsableAnswer,
        "AnthropicProvider": AnthropicProvider,
        "LiteLLMProvider": LiteLLMProvider,
    }
    for name, obj in expected.items():
        assert name in moa_stream.__all__
        assert getattr(moa_stream, name) is obj


def test_importing_the_package_loads_no_optional_extra() -> None:
    code = (
        "import sys, moa_stream; "
        "print(','.join(m for m in ('litellm', 'anthropic', 'opentelemetry', 'fastapi') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
