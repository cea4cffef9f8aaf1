"""Protobuf Structs as plain Python, non-finite numbers refused (mhv_common.structs)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import json_format, struct_pb2

from mhv_common.structs import NOT_FINITE, NotFiniteError, plain_struct

STRUCTS = [
    {},
    {"": "", "none": None, "yes": True, "no": False},
    {"int": 3, "float": 2.5, "neg": -0.0, "big": 1e300, "tiny": 5e-324, "exact": 2**53},
    {"labels": ["infra", 1, None, [], {}], "nested": {"a": {"b": [{"c": [True]}]}}},
    {"unicode \u00e9\u202e": "\U0001f680 \u05ea\u05e7\u05df", "nul\x00": "a\x00b"},
]


@pytest.mark.parametrize("value", STRUCTS)
def test_structs_decode_as_json_format_does(value: dict[str, Any]) -> None:
    struct = struct_pb2.Struct()
    struct.update(value)
    # As JSON text: the same types too (3.0 stays a float, as stored and fingerprinted).
    ours, theirs = plain_struct(struct), json_format.MessageToDict(struct)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


@pytest.mark.parametrize(
    "value",
    [
        {"ratio": math.nan},
        {"list": [1.0, math.inf]},
        {"deep": {"er": [{"still": -math.inf}]}},
    ],
)
def test_non_finite_numbers_are_refused_wherever_they_are(value: dict[str, Any]) -> None:
    struct = struct_pb2.Struct()
    struct.update(value)
    with pytest.raises(NotFiniteError) as refused:
        plain_struct(struct)
    assert isinstance(refused.value, ValueError)
    assert str(refused.value) == NOT_FINITE
