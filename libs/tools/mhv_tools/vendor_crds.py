"""Vendor the schemas of the custom resources the manifests use, from their published CRDs.

Run as ``python -m mhv_tools.vendor_crds CRD.yaml...`` with the upstream CRD files (each
project's release tag; deploy/kubernetes/schemas/SOURCES.md lists which). For every served
version of every CRD it writes ``deploy/kubernetes/schemas/<group>/<kind>_<version>.json``: the
version's ``openAPIV3Schema`` without its ``description`` texts (they are most of the bytes and
none of the rules), and prints each input's SHA-256 for SOURCES.md.

tests/deploy/ validates every custom object of the rendered manifests against these schemas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from mhv_tools._generated import ROOT

SCHEMAS_DIR = ROOT / "deploy" / "kubernetes" / "schemas"


def without_descriptions(node: Any) -> Any:
    """`node` with every ``description`` member of a schema object removed."""
    if isinstance(node, dict):
        return {
            k: without_descriptions(v)
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def schema_path(group: str, kind: str, version: str) -> Path:
    """Where the schema of `kind` in `group`/`version` is vendored."""
    return SCHEMAS_DIR / group / f"{kind.lower()}_{version}.json"


def vendor(crd_file: Path) -> list[Path]:
    """Write the schemas of every CRD in `crd_file`; return the files written."""
    written: list[Path] = []
    for crd in yaml.safe_load_all(crd_file.read_text()):
        if not crd or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = without_descriptions(version["schema"]["openAPIV3Schema"])
            path = schema_path(group, kind, version["name"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Vendor the given CRD files."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("crd_files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for crd_file in args.crd_files:
        digest = hashlib.sha256(crd_file.read_bytes()).hexdigest()
        for path in vendor(crd_file):
            print(f"{crd_file.name} sha256:{digest} -> {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
