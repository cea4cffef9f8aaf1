"""The vocabulary the schemes map deliveries onto: usernames, logins, cut text."""

from __future__ import annotations

from mhv_webhook._changes import cut, login, username


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
