# Mahavishnu: `make run` starts the whole system, `make test` runs every check.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install monitoring-tools backup-tools run test lint typecheck security-lint buflint generate check-generated lock audit-deps image clean

help:
	@echo "make run       start task, audit and webhook services (and a private PostgreSQL"
	@echo "               when MHV_DATABASE_URL is unset); Ctrl-C stops everything"
	@echo "make test      lint, type-check, buf lint, and the whole test suite"
	@echo "make generate  regenerate protobuf code, error pages, alert rules, dashboards, the"
	@echo "               Kubernetes manifests (deploy/kubernetes/base and rendered/) and the"
	@echo "               task events' JSON Schema (docs/webhooks/)"
	@echo "make lock      re-resolve requirements.lock from pyproject.toml"
	@echo "make image     build the container image (buildah, Debian 12 bases) and run it once"

# One locked dependency set for the whole monorepo: requirements.lock pins every package with
# its hashes; the project itself is installed editable on top of it. The editable install
# records which packages have an __init__.py (the others import as namespace packages), so
# adding or removing one reinstalls. The lock is complete, so pip installs it with --no-deps:
# two packages' unused declared dependencies are left out on purpose (pyproject.toml, [tool.uv]).
$(STAMP): pyproject.toml requirements.lock $(wildcard libs/*/*/__init__.py services/*/*/__init__.py)
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) is required"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(STAMP) proto/node_modules/.installed

proto/node_modules/.installed: proto/package.json proto/package-lock.json
	cd proto && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The tests run the real promtool, prometheus, amtool and alertmanager: Debian's prometheus (2.42)
# and prometheus-alertmanager (0.25), installed with apt-get when missing.
monitoring-tools:
	./deploy/install-tools.sh

# Barman (the engine behind `mhv backup` and `mhv restore`) in .tools/barman/, from
# deploy/backup/requirements.lock; gpg for backup encryption.
backup-tools:
	./deploy/install-tools.sh backup

run: $(STAMP)
	@./deploy/install-tools.sh backup || echo "Barman could not be installed: mhv up runs without backups"
	$(BIN)/mhv up

generate: $(STAMP)
	$(BIN)/python -m mhv_tools.gen_protos
	$(BIN)/python -m mhv_tools.gen_error_docs
	$(BIN)/python -m mhv_tools.gen_rules
	$(BIN)/python -m mhv_tools.gen_dashboards
	$(BIN)/python -m mhv_tools.gen_kubernetes
	$(BIN)/python -m mhv_tools.gen_schemas

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy libs/common/mhv_common services/task/mhv_task services/audit/mhv_audit \
		services/webhook/mhv_webhook libs/cli/mhv_cli libs/tools/mhv_tools

buflint: proto/node_modules/.installed
	cd proto && npx --no-install buf lint

# bandit over our own code (the generated protobuf code and the tests left out: see
# [tool.bandit]). Each finding is fixed, or justified where it is: `# nosec BNNN: reason`.
# bandit reads the reason's words as test names, and warns about a statement's inner parts
# that its nosec covers: those warnings are dropped, the findings and the status are not.
security-lint: $(STAMP)
	set -o pipefail; $(BIN)/bandit -ll -q -c pyproject.toml -r libs services bench scripts 2>&1 \
		| { grep -v -e "is not a test name or id, ignoring" -e "nosec encountered" || true; }

test: install monitoring-tools backup-tools lint typecheck security-lint buflint
	$(BIN)/pytest

lock:
	$(BIN)/python -m pip install --quiet uv==0.13.9
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra local --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock
	$(BIN)/uv pip compile deploy/backup/requirements.in --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o deploy/backup/requirements.lock
	# The container image installs only what the services need at run time: the same pins
	# and hashes as requirements.lock, without the dev extra (tests/container check the subset).
	$(BIN)/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -c requirements.lock \
		-o deploy/container/requirements-runtime.lock

# Minutes, and needs root for mmdebstrap and runc: not part of `make test` (which lints the
# Containerfile and tests the entrypoint).
image: $(STAMP)
	./deploy/container/build-image.sh

# Known vulnerabilities in the locked dependencies. pip-audit asks the PyPI/OSV vulnerability
# database, which CI cannot reach, so this is not part of `make test`: run it where that
# database is reachable (docs/security/dependencies.md).
audit-deps: $(STAMP)
	$(BIN)/pip-audit --strict --progress-spinner off -r requirements.lock

clean:
	rm -rf $(VENV) .tools proto/node_modules .pytest_cache .mypy_cache .ruff_cache
