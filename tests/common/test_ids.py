"""UUIDs a caller sends, checked once, the same way everywhere (mhv_common.ids)."""

from __future__ import annotations

import uuid

import pytest

from mhv_common.errors import FieldViolation, ValidationError
from mhv_common.ids import canonical_uuid, parse_uuid, uuid_or_none

ID = uuid.UUID("0b6b8f9e-3f4a-4c1e-9d2b-7a1c2e3f4a5b")


@pytest.mark.parametrize("text", [str(ID), str(ID).upper()])
def test_the_canonical_spelling_in_either_case_is_an_id(text: str) -> None:
    assert parse_uuid(text, field="user_id") == ID
    assert canonical_uuid(text, field="user_id") == str(ID)
    assert uuid_or_none(text) == ID


@pytest.mark.parametrize(
    "text",
    [
        "",
        "alice",
        ID.hex,  # no hyphens
        f"{{{ID}}}",
        f"urn:uuid:{ID}",
        f"{ID}\n",
        f" {ID}",
        str(ID)[:-1] + "g",
        "0b6b8f9e3f4a-4c1e-9d2b-7a1c-2e3f4a5b",  # hyphens elsewhere
    ],
)
def test_other_spellings_are_refused_naming_the_field(text: str) -> None:
    assert uuid_or_none(text) is None
    for parse in (parse_uuid, canonical_uuid):
        with pytest.raises(ValidationError) as caught:
            parse(text, field="events[3].user_id", description="must be the actor's user id")
        assert caught.value.code == "MHV-003"
        assert caught.value.violations == (
            FieldViolation("events[3].user_id", "must be the actor's user id"),
        )


def test_the_default_description_and_a_message_of_its_own() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_uuid("x", field="id")
    assert caught.value.violations == (FieldViolation("id", "must be a UUID"),)
    assert caught.value.message == "The request is invalid."
    with pytest.raises(ValidationError, match="The delivery id is not a UUID"):
        parse_uuid("x", field="id", message="The delivery id is not a UUID.")
