"""Masking keys in text that leaves the process, whole or cut."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from moa_stream._secrets import MASK, MIN_PREFIX, mask_secrets

KEY = "sk-proj-Zq8vT1mN4bX7cR2wY5uK9pL3"


def test_whole_keys_and_long_prefixes_are_masked() -> None:
    assert mask_secrets(f"bad key {KEY}.", [KEY]) == f"bad key {MASK}."
    cut = f"bad key {KEY[:20]}"
    assert mask_secrets(cut, [KEY]) == f"bad key {MASK}"
    assert mask_secrets(f"{KEY[:12]} and {KEY[:12]}", [KEY]) == f"{MASK} and {MASK}"
    # Short runs are ordinary text.
    assert mask_secrets("sk-proj", [KEY]) == "sk-proj"
    assert mask_secrets("nothing here", [KEY, ""]) == "nothing here"


@given(
    st.text(max_size=40),
    st.text(max_size=40),
    st.integers(min_value=0, max_value=len(KEY)),
)
def test_no_long_piece_of_a_key_survives_a_cut(before: str, after: str, cut: int) -> None:
    text = before + KEY + after
    for masked in (
        mask_secrets(text[: len(before) + cut], [KEY]),  # masked after the cut
        mask_secrets(text, [KEY])[: len(before) + cut],  # masked before it
    ):
        for i in range(len(KEY) - MIN_PREFIX + 1):
            assert (
                KEY[i : i + MIN_PREFIX] not in masked or KEY[i : i + MIN_PREFIX] in before + after
            )
