"""Config mistakes in a policy keep their place (file and field) and say what to write."""

from __future__ import annotations

import pytest

from moa_stream import ConfigError
from moa_stream.config import loads_config

BASE = """
[providers.sim]
kind = "sim"
[agents.a]
provider = "sim"
model = "small-fast"
[agents.b]
provider = "sim"
model = "medium"
[agents.c]
provider = "sim"
model = "large-slow"
[moa.quick]
proposers = ["a", "b", "c"]
aggregator = "a"
"""


def _error(policy: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        loads_config(BASE + extra + f"policy = {policy!r}\n", "my.toml")
    return str(info.value)


def test_a_policy_asking_for_more_proposers_than_the_layer_has_names_file_and_field() -> None:
    message = _error("quorum(4)")
    assert message.startswith("my.toml: moa.quick.policy: "), message
    assert "asks for 4 proposers" in message and "has 3" in message


def test_self_moa_samples_count_as_the_layers_proposers() -> None:
    message = _error("quorum(5)", 'preset = "self_moa"\nsamples = 4\n')
    assert message.startswith("my.toml: moa.quick.policy: ") and "has 4 samples" in message
    loads_config(BASE + 'preset = "self_moa"\nsamples = 5\npolicy = "quorum(5)"\n')


def test_or_between_policies_says_how_policies_combine_and_that_durations_are_seconds() -> None:
    message = _error("quorum(2) or deadline(2s)")
    assert message.startswith("my.toml: moa.quick.policy: "), message
    assert "'|'" in message and "'&'" in message and "'or'" in message
    assert "plain seconds" in message and "'2s'" in message
    assert "eof" not in message


def test_a_negative_duration_says_durations_are_non_negative_seconds() -> None:
    message = _error("deadline(-1)")
    assert "non-negative seconds" in message and "unexpected character" not in message
