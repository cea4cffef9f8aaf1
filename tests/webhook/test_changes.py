"""The vocabulary the schemes map deliveries onto: usernames, logins, cut text."""

from __future__ import annotations

import datetime as dt

from mhv_webhook._changes import (
    cut,
    login,
    logins,
    merged_metadata,
    names,
    sender_time,
    username,
    usernames,
)


def test_usernames_are_prefixed_cleaned_and_bounded() -> None:
    assert username("github", "octocat") == "github.octocat"
    assert username("gitlab", "dev one/ü@x") == "gitlab.dev-one-ü-x"
    assert username("github", "a" * 200) == "github." + "a" * 93
    assert len(username("github", "a" * 200)) == 100


def test_login_is_read_from_either_field_name() -> None:
    assert login({"login": "octocat"}) == "octocat"
    assert login({"username": "gitlab-user"}) == "gitlab-user"
    assert login({"login": 7}) == ""
    assert login("octocat") == ""
    assert login(None) == ""


def test_text_is_cut_and_non_text_dropped() -> None:
    assert cut("abcdef", 3) == "abc"
    assert cut(["abc"], 3) == ""
    assert cut(None, 3) == ""


def test_logins_and_names_of_lists_or_none_when_not_said() -> None:
    assert logins([{"login": "a"}, {"username": "b"}, {"name": "c"}]) == ("a", "b")
    assert logins(None) is None
    assert usernames("gitlab", ("a", "b c")) == ("gitlab.a", "gitlab.b-c")
    assert usernames("gitlab", None) is None
    assert names([{"name": "bug"}, {"name": ""}, "x", {"name": "n" * 200}], "name") == [
        "bug",
        "n" * 100,
    ]
    assert names([{"title": "bug"}] * 80, "title") == ["bug"] * 50
    assert names(None, "name") is None


def test_sender_times_in_either_senders_form() -> None:
    utc = dt.datetime(2017, 9, 15, 16, 52, tzinfo=dt.UTC)
    assert sender_time("2017-09-15T16:52:00Z") == utc
    assert sender_time("2017-09-15 16:52:00 UTC") == utc
    assert sender_time("2017-09-15t18:52:00+02:00") == utc
    assert sender_time("2017-09-15T16:52:00") == utc
    for unknown in ("yesterday", "", None, 1505494320, "2017-13-15T16:52:00Z"):
        assert sender_time(unknown) is None


def test_metadata_keys_are_set_or_removed_and_others_kept() -> None:
    current = {"labels": ["old"], "milestone": {"id": 1}, "points": 3}
    assert merged_metadata(current, {"labels": ["bug"], "milestone": None, "origin": {}}) == {
        "labels": ["bug"],
        "points": 3,
        "origin": {},
    }
    assert current == {"labels": ["old"], "milestone": {"id": 1}, "points": 3}
