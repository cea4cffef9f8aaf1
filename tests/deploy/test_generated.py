"""The base is what the generator writes from the code, the rendering what kustomize makes of it."""

from __future__ import annotations

import yaml

from mhv_tools import gen_kubernetes


def test_base_and_rendered_manifests_are_current() -> None:
    assert gen_kubernetes.main(["--check"]) == 0, "deploy/kubernetes is stale: run `make generate`"


def test_every_overlay_resource_exists() -> None:
    kustomization = yaml.safe_load((gen_kubernetes.OVERLAY_DIR / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (gen_kubernetes.OVERLAY_DIR / resource).exists(), resource
