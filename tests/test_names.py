"""The name validator: its fast path never accepts what the full rules refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mi_crow.store._names import _PLAIN_NAME, check_batch_index, check_name, check_name_fully, check_relpath


@settings(max_examples=2000, deadline=None)
@given(st.text(st.characters(max_codepoint=0x17F), max_size=210) | st.text(max_size=30))
def test_fast_path_agrees_with_full_rules(value: str) -> None:
    try:
        check_name_fully(value, "name")
        valid = True
    except ValueError:
        valid = False
    if _PLAIN_NAME.fullmatch(value):
        assert valid, value
    try:
        check_name(value, "name")
        assert valid
    except ValueError:
        assert not valid


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("", "non-empty"),
        ("  ", "non-blank"),
        ("..", "not allowed"),
        (".git", "reserved"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("a\x00b", "control character"),
        ("x" * 201, "201 bytes"),
        ("é" * 101, "202 bytes"),
        ("\ud800", "UTF-8"),
        (5, "must be a str, got int 5"),
    ],
)
def test_each_rule_has_its_message(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="run_id") as info:
        check_name(value, "run_id")
    assert fragment in str(info.value)


def test_accepted_names() -> None:
    for ok in ("model.layers.0", "h.3/attn"[:3], "a b", "x" * 200, "é" * 100, "日本", "layer-0_(mlp)", "a.", "-"):
        assert check_name(ok, "name") == ok


def test_relpaths_and_indices() -> None:
    assert check_relpath("runs/exp 1", "p") == "runs/exp 1"
    for bad in ("", "/a", "a//b", "a/", "../a", "a/./b"):
        with pytest.raises(ValueError):
            check_relpath(bad, "p")
    assert check_batch_index(7) == 7
    for bad in (True, 1.0, "1", -1, None):
        with pytest.raises(ValueError, match="batch_index"):
            check_batch_index(bad)
