"""The YAML settings: repositories and their senders' names, webhook sources and their caps."""

from __future__ import annotations

from pathlib import Path

import pytest

from mhv_common.config import (
    DEFAULT_BODY_CAPS,
    DEFAULT_WEBHOOKS_FILE,
    WebhookSource,
    load_repositories,
    load_webhook_sources,
)
from mhv_common.errors import ConfigurationError


def test_every_listed_name_files_into_its_repository(tmp_path: Path) -> None:
    path = tmp_path / "repos.yaml"
    path.write_text(
        "repositories:\n"
        "  - name: demo\n"
        "    github: [example/demo, Example/Demo-Renamed]\n"
        "    gitlab: example/demo\n"
        "  - name: other\n"
        "    gitlab: [group/sub/other]\n"
    )
    catalog = load_repositories(path)
    demo = catalog.get("demo")
    assert demo is not None and demo.github == ("example/demo", "Example/Demo-Renamed")
    assert catalog.by_external(github="example/demo") == demo
    assert catalog.by_external(github="example/demo-renamed") == demo
    assert catalog.by_external(gitlab="EXAMPLE/demo") == demo
    other = catalog.by_external(gitlab="group/sub/other")
    assert other is not None and other.name == "other"
    assert catalog.by_external(github="group/sub/other") is None
    assert catalog.by_external(github="someone/else") is None


def test_body_caps_default_to_each_senders_maximum() -> None:
    assert DEFAULT_BODY_CAPS == {
        "github": 25 * 1024 * 1024,
        "gitlab": 25 * 1024 * 1024,
        "standard": 1024 * 1024,
    }
    shipped = {s.name: s.body_cap_bytes for s in load_webhook_sources(DEFAULT_WEBHOOKS_FILE)}
    assert shipped == {"github": 26_214_400, "gitlab": 26_214_400, "generic": 1_048_576}
    # A cap set in the file wins over the default.
    own = WebhookSource.model_validate({"name": "x", "scheme": "gitlab", "body_cap_bytes": 10})
    assert own.body_cap_bytes == 10


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "repositories:\n  - name: a\n    gitlab: [g/x, g/x]\n",
            "repos.yaml:3: repositories.0.gitlab: 'g/x' is already mapped to repository 'a'",
        ),
        (
            "repositories:\n  - name: a\n    github: g/x\n  - name: b\n    github: G/x\n",
            "repos.yaml:5: repositories.1.github: 'G/x' is already mapped to repository 'a'",
        ),
        ("repositories:\n  - name: a\n    github: just-a-name\n", "repos.yaml:3:"),
    ],
)
def test_a_senders_name_maps_to_one_repository_only(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "repos.yaml"
    path.write_text(content)
    with pytest.raises(ConfigurationError) as refused:
        load_repositories(path)
    assert message in refused.value.message
    # The same name on the other sender is another name.
    path.write_text("repositories:\n  - name: a\n    github: g/x\n    gitlab: g/x\n")
    assert load_repositories(path).by_external(gitlab="g/x") is not None
