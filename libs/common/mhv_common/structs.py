"""Protobuf ``Struct`` values (free-form JSON a caller sends) as plain Python, checked once.

A ``Struct`` carries numbers as doubles, so NaN and the infinities cross the wire; JSON, and
so PostgreSQL's jsonb and the audit chain's canonical text, has neither. Decoding refuses them
with `NotFiniteError`, a `ValueError` whose text is the field violation's description; the
domain reports it under the field's name with the request's other violations (the task
models, the audit batch). The other direction needs nothing of ours: ``Struct.update`` takes a
plain dict.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf import struct_pb2

NOT_FINITE = "must hold only finite numbers (no NaN or infinity)"
"""The field violation's description for a Struct holding NaN or an infinity."""


class NotFiniteError(ValueError):
    """A Struct holds NaN or an infinity; its text is `NOT_FINITE`."""

    def __init__(self) -> None:
        super().__init__(NOT_FINITE)


def _plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise NotFiniteError
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return plain_struct(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    return None


def plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as a plain dict, the types ``json_format.MessageToDict`` gives, but faster.

    Raises:
        NotFiniteError: A number in it is NaN or an infinity.

    """
    return {key: _plain(item) for key, item in struct.fields.items()}


__all__ = ["NOT_FINITE", "NotFiniteError", "plain_struct"]
