"""Prometheus rules: generated from the SLO spec, lint-clean, and unit-tested with promtool.

The promtool unit tests live in deploy/prometheus/tests/. Here we run them, check that every
alert has a case where it fires and one where it must stay silent (and, for alerts with `for:`,
one while it is still pending), and show that those cases catch wrong rules: each mutation of a
generated rule below, the plan's own mistakes among them, must make promtool fail.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from mhv_tools import gen_rules
from tests.observability.tools import DEPLOY, ROOT, RULE_TESTS_DIR, RULES_DIR, run

# The Watchdog exists to fire always; a case where it stays silent cannot exist.
ALWAYS_FIRING = {"Watchdog"}


def load_rules() -> list[dict[str, Any]]:
    """Every rule of the committed rule files."""
    rules = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            rules.extend(group["rules"])
    return rules


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule."""
    return [r for r in load_rules() if "alert" in r]


def duration_seconds(text: str) -> float:
    """A Prometheus duration such as 1h30m as seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total, number = 0.0, ""
    index = 0
    while index < len(text):
        char = text[index]
        if char.isdigit():
            number += char
            index += 1
            continue
        unit = "ms" if text.startswith("ms", index) else char
        total += int(number) * units[unit]
        number = ""
        index += len(unit)
    return total


def test_committed_rules_match_the_spec() -> None:
    assert gen_rules.main(["--check"]) == 0, "deploy/prometheus/rules is stale: make generate"


def test_rules_check_detects_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gen_rules, "RULES_DIR", tmp_path)
    assert gen_rules.main([]) == 0
    assert gen_rules.main(["--check"]) == 0
    edited = tmp_path / "slo_task_availability.yml"
    edited.write_text(edited.read_text().replace("(14.4 * 0.001)", "(20 * 0.001)"))
    assert gen_rules.main(["--check"]) == 1
    assert gen_rules.main([]) == 0
    (tmp_path / "old_alerts.yml").write_text("groups: []\n")
    assert gen_rules.main(["--check"]) == 1
    assert gen_rules.main([]) == 0
    assert not (tmp_path / "old_alerts.yml").exists()


def test_rules_pass_promtool_lint() -> None:
    files = sorted(RULES_DIR.glob("*.yml"))
    result = run("promtool", "check", "rules", "--lint=all", "--lint-fatal", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_reference_prometheus_config_is_valid() -> None:
    # Also loads and checks every rule file it names.
    result = run("promtool", "check", "config", DEPLOY / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _promtool_test(path: Path) -> tuple[Path, int, str]:
    result = run("promtool", "test", "rules", path, timeout=120)
    return path, result.returncode, result.stdout + result.stderr


def test_promtool_unit_tests_pass() -> None:
    files = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert files
    # promtool is single-threaded; the files are independent.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_promtool_test, files))
    failures = [f"{path.name}:\n{output}" for path, code, output in results if code != 0]
    assert not failures, "\n".join(failures)


@dataclass(frozen=True)
class Case:
    """One `alert_rule_test` entry: an alert checked at one time of one test group."""

    file: str
    group: str
    at: float
    fires: bool


def rule_test_cases() -> dict[str, list[Case]]:
    """Alert name -> every promtool case that checks it."""
    cases: dict[str, list[Case]] = defaultdict(list)
    for path in sorted(RULE_TESTS_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["tests"]:
            for check in group.get("alert_rule_test", []):
                cases[check["alertname"]].append(
                    Case(
                        path.name,
                        group.get("name", ""),
                        duration_seconds(check["eval_time"]),
                        bool(check.get("exp_alerts")),
                    )
                )
    return cases


def test_every_alert_has_a_firing_and_a_silent_case() -> None:
    cases = rule_test_cases()
    problems = []
    for rule in alert_rules():
        name = rule["alert"]
        mine = cases.get(name, [])
        if not any(c.fires for c in mine):
            problems.append(f"{name}: no case where it fires")
        if name not in ALWAYS_FIRING and not any(not c.fires for c in mine):
            problems.append(f"{name}: no case where it must stay silent")
        if "for" in rule:
            # Silent while pending: the same input is checked silent, then firing no more than
            # `for` later.
            pending = duration_seconds(rule["for"])
            shown = any(
                quiet.group == loud.group
                and quiet.file == loud.file
                and not quiet.fires
                and loud.fires
                and 0 < loud.at - quiet.at <= pending
                for quiet in mine
                for loud in mine
            )
            if not shown:
                problems.append(f"{name}: no case silent before its for: {rule['for']} elapses")
    assert not problems, "\n".join(problems)


def test_the_coverage_check_sees_a_missing_case() -> None:
    # The check above must not pass vacuously: the alerts it walks are the ones generated.
    names = {r["alert"] for r in alert_rules()}
    assert len(names) == len(alert_rules()), "alert names must be unique"
    assert set(rule_test_cases()) == names


def test_every_alert_carries_severity_annotations_and_a_runbook_that_exists() -> None:
    spec = gen_rules.load_spec()
    problems = []
    for rule in alert_rules():
        name, labels, notes = rule["alert"], rule.get("labels", {}), rule.get("annotations", {})
        allowed = {"none"} if name in ALWAYS_FIRING else {"page", "warning", "ticket"}
        if labels.get("severity") not in allowed:
            problems.append(f"{name}: severity {labels.get('severity')!r} not in {allowed}")
        for key in ("summary", "description", "runbook_url"):
            if not str(notes.get(key, "")).strip():
                problems.append(f"{name}: no {key}")
        url = str(notes.get("runbook_url", ""))
        if not url.startswith(spec.runbook_base_url):
            problems.append(f"{name}: runbook_url {url} outside {spec.runbook_base_url}")
            continue
        page = url.removeprefix(spec.runbook_base_url)
        if not page.startswith("docs/runbooks/") or not (ROOT / page).is_file():
            problems.append(f"{name}: runbook {page} does not exist")
        elif f"`{name}`" not in (ROOT / page).read_text():
            problems.append(f"{name}: its runbook {page} does not name it")
    assert not problems, "\n".join(problems)


def _runbook_links(document: Any) -> list[str]:
    if isinstance(document, dict):
        found = [str(v) for k, v in document.items() if k == "runbook_url"]
        return found + [link for v in document.values() for link in _runbook_links(v)]
    if isinstance(document, list):
        return [link for item in document for link in _runbook_links(item)]
    return []


def test_every_runbook_link_opens_a_file_of_this_repository() -> None:
    # With the spec's default base, what an alert links to is a path of this repository, in
    # the rule files Prometheus loads and in the Kubernetes PrometheusRule alike.
    assert gen_rules.load_spec().runbook_base_url == ""
    files = [*RULES_DIR.glob("*.yml"), DEPLOY / "kubernetes" / "base" / "monitoring.yaml"]
    links = [
        link
        for path in files
        for document in yaml.safe_load_all(path.read_text())
        for link in _runbook_links(document)
    ]
    assert len(links) >= len(alert_rules())
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, missing


def test_the_spec_holds_the_plans_objectives() -> None:
    spec = gen_rules.load_spec()
    assert {s.name: s.objective for s in spec.slos} == {
        "task_creation_latency": 95,
        "task_availability": 99.9,
        "webhook_availability": 99.5,
        "workflow_success": 95,
        "search_success": 95,
    }
    assert {s.window for s in spec.slos} == {"30d"}
    assert all(s.owner and (ROOT / s.runbook).is_file() for s in spec.slos)
    # The latency SLO counts creations over 100 ms, from the histogram's 0.1 bucket.
    latency = spec.slo("task_creation_latency").sli
    assert latency.good is not None
    assert 'le="0.1"' in latency.good


def test_plan_alerts_are_generated_as_required() -> None:
    rules = {r["alert"]: r for r in alert_rules()}
    assert rules["TaskCreationLatencyHigh"]["expr"] == (
        "histogram_quantile(0.95, sum by (le) (rate("
        'task_creation_duration_seconds_bucket{job="mahavishnu-task"}[5m]))) > 0.1'
    )
    assert rules["TaskCreationLatencyHigh"]["for"] == "10m"
    steps = {
        name: (rules[name]["expr"], rules[name]["for"], rules[name]["labels"]["severity"])
        for name in (
            "ErrorBudgetBurnRateWarning",
            "ErrorBudgetBurnRateCritical",
            "ErrorBudgetBurnRateEmergency",
        )
    }
    assert steps == {
        "ErrorBudgetBurnRateWarning": ("slo_burn_rate > 2", "5m", "warning"),
        "ErrorBudgetBurnRateCritical": ("slo_burn_rate > 5", "1m", "page"),
        "ErrorBudgetBurnRateEmergency": ("slo_burn_rate > 10", "30s", "page"),
    }
    absent = {r["expr"] for r in rules.values() if r["expr"].startswith("absent(")}
    assert absent == {f'absent(up{{job="{job}"}})' for job in gen_rules.JOBS.values()}
    for job in gen_rules.JOBS.values():
        assert job in rules["TargetDown"]["expr"]
    assert rules["Watchdog"]["expr"] == "vector(1)"
    # The plan's gauges are recorded, not set by each process.
    recorded = {r["record"] for r in load_rules() if "record" in r}
    assert {"slo_burn_rate", "slo_error_budget_remaining_seconds", "task_availability"} <= recorded


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"errors": "sum(rate(x[{{.window}}]))", "good": "sum(rate(y[{{.window}}]))"}, "exactly"),
        ({}, "exactly"),
        ({"errors": "sum(rate(x[5m]))"}, "lacks {{.window}}"),
    ],
)
def test_spec_rejects_an_ambiguous_sli(document: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        gen_rules.Sli.model_validate({"total": "sum(rate(t[{{.window}}]))", **document})


def test_spec_rejects_duplicate_slos() -> None:
    raw = yaml.safe_load(gen_rules.SPEC_FILE.read_text())
    raw["slos"].append(dict(raw["slos"][0]))
    with pytest.raises(ValidationError, match="duplicate SLO name: task_creation_latency"):
        gen_rules.Spec.model_validate(raw)


@dataclass(frozen=True)
class Mutation:
    """A wrong rule, and the promtool case that must notice it.

    `source` is the SLO spec (the rules are then regenerated from it) or a generated rule file;
    `text` in it becomes `replacement`; then the test group `group` of `test_file` must fail.
    """

    source: str
    text: str
    replacement: str
    test_file: str
    group: str


MUTATIONS = {
    "page at 15x instead of 14.4x": Mutation(
        "slo_task_availability.yml",
        "(14.4 * 0.001)",
        "(15 * 0.001)",
        "slo_task_availability_fast_burn_test.yml",
        "pages: 14.4x the budget over the last hour and the last 5 minutes",
    ),
    "page without the short window": Mutation(
        "slo_webhook_availability.yml",
        "\n      and\n        "
        'slo:sli_error:ratio_rate5m{slo_name="webhook_availability"} > (14.4 * 0.005)',
        "",
        "slo_webhook_availability_fast_burn_test.yml",
        "resolves: soon after a fast burn stops (the 5m window is clean)",
    ),
    "page over 2h instead of 1h": Mutation(
        "slo_workflow_success.yml",
        'slo:sli_error:ratio_rate1h{slo_name="workflow_success"} > (14.4 * 0.05)',
        'slo:sli_error:ratio_rate2h{slo_name="workflow_success"} > (14.4 * 0.05)',
        "slo_workflow_success_fast_burn_test.yml",
        "pages: 14.4x the budget over the last hour and the last 5 minutes",
    ),
    "ticket over 1d instead of 3d": Mutation(
        "slo_search_success.yml",
        'slo:sli_error:ratio_rate3d{slo_name="search_success"} > (1 * 0.05)',
        'slo:sli_error:ratio_rate1d{slo_name="search_success"} > (1 * 0.05)',
        "slo_search_success_slow_burn_test.yml",
        "ticket: the 3-day window remembers a burn the last day hid",
    ),
    "latency SLI from the 0.5 bucket": Mutation(
        "slos.yaml",
        'le="0.1"',
        'le="0.5"',
        "slo_task_creation_latency_fast_burn_test.yml",
        "pages: slow creations summed over repositories and replicas",
    ),
    "availability counting callers' mistakes": Mutation(
        "slos.yaml",
        'grpc_code=~"INTERNAL|',
        'grpc_code=~"INVALID_ARGUMENT|NOT_FOUND|INTERNAL|',
        "slo_task_availability_fast_burn_test.yml",
        "silent: callers' mistakes and other services' failures do not count",
    ),
    "availability counting other services": Mutation(
        "slos.yaml",
        'grpc_server_handled_total{job="mahavishnu-task",grpc_code=~',
        "grpc_server_handled_total{grpc_code=~",
        "slo_task_availability_fast_burn_test.yml",
        "silent: callers' mistakes and other services' failures do not count",
    ),
    "webhook availability counting 4xx": Mutation(
        "slos.yaml",
        'code=~"5.."',
        'code=~"[45].."',
        "slo_webhook_availability_fast_burn_test.yml",
        "silent: senders' mistakes (4xx) do not count",
    ),
    "workflow counting only dead letters": Mutation(
        "slos.yaml",
        'outcome=~"compensated|dead_letter"',
        'outcome="dead_letter"',
        "slo_workflow_success_fast_burn_test.yml",
        "pages: compensated and dead-lettered sagas both count",
    ),
    "search counting rejected searches": Mutation(
        "slos.yaml",
        'status!="rejected"',
        'status=~".+"',
        "slo_search_success_fast_burn_test.yml",
        "pages: rejected searches are not eligible, so they do not dilute failures",
    ),
    "emergency after 2m instead of 30s": Mutation(
        "slo_policy_alerts.yml",
        "for: 30s",
        "for: 2m",
        "slo_policy_test.yml",
        "burn rate 11x: emergency after 30s, critical after 1m, warning after 5m",
    ),
    "warning at 3x instead of 2x": Mutation(
        "slo_policy_alerts.yml",
        "expr: slo_burn_rate > 2",
        "expr: slo_burn_rate > 3",
        "slo_policy_test.yml",
        "burn rate 2.1x: a warning after 5m, nothing more",
    ),
    "plan's histogram_quantile without rate and sum by (le)": Mutation(
        "slo_policy_alerts.yml",
        'histogram_quantile(0.95, sum by (le) (rate(task_creation_duration_seconds_bucket{job="'
        'mahavishnu-task"}[5m]))) > 0.1',
        'histogram_quantile(0.95, task_creation_duration_seconds_bucket{job="mahavishnu-task"})'
        " > 0.1",
        "slo_plan_alerts_test.yml",
        "TaskCreationLatencyHigh: p95 of 300ms across repositories, pending for 10m",
    ),
    "TaskAvailabilityLow on the 5m ratio": Mutation(
        "slo_task_availability.yml",
        "record: task_availability\n    expr: 1 - slo:sli_error:ratio_rate30d",
        "record: task_availability\n    expr: 1 - slo:sli_error:ratio_rate5m",
        "slo_plan_alerts_test.yml",
        "TaskAvailabilityLow: a spent budget stays spent after the failures stop",
    ),
    "plan's pool alert on an absolute count": Mutation(
        "platform_alerts.yml",
        'database_connections{database="postgresql"}\n      /\n      '
        'database_pool_size{database="postgresql"}\n      > 0.9',
        'database_connections{database="postgresql"} > 90',
        "platform_alerts_test.yml",
        "DatabaseConnectionPoolExhausted: a fraction of each pool, not a connection count",
    ),
    "target down for another job": Mutation(
        "platform_alerts.yml",
        'up{job=~"mahavishnu-task|mahavishnu-audit|mahavishnu-webhook"} == 0',
        "up == 0",
        "platform_alerts_test.yml",
        "TargetDown: one of our targets failing its scrapes for 5m",
    ),
    "backups allowed two days instead of 26 hours": Mutation(
        "slos.yaml",
        "max_backup_age: 26h",
        "max_backup_age: 2d",
        "backup_alerts_test.yml",
        "BackupTooOld: a missed daily backup fires after 26h and 15 minutes",
    ),
    "a backup of another job counting as ours": Mutation(
        "backup_alerts.yml",
        'absent(mhv_backup_last_success_timestamp_seconds{job="mahavishnu-backup"})',
        "absent(mhv_backup_last_success_timestamp_seconds)",
        "backup_alerts_test.yml",
        "BackupTooOld: a repository that never reported a backup counts as never backed up",
    ),
    "verification judged by its last success only": Mutation(
        "backup_alerts.yml",
        'max by (job) (mhv_backup_verification_last_ok{job="mahavishnu-backup"}) == 0'
        "\n      or\n      ",
        "",
        "backup_alerts_test.yml",
        "BackupVerificationFailed: a failed verification fires after 5 minutes",
    ),
    "WAL alert blind to unarchived segments": Mutation(
        "slos.yaml",
        "max_unarchived_segments: 8",
        "max_unarchived_segments: 100",
        "backup_alerts_test.yml",
        "WalArchivingFailing: received WAL piling up unarchived",
    ),
    "budget remaining without the window length": Mutation(
        "slo_task_availability.yml",
        '(0.001 - slo:sli_error:ratio_rate30d{slo_name="task_availability"}) * 2592000',
        '(0.001 - slo:sli_error:ratio_rate30d{slo_name="task_availability"}) * 86400',
        "slo_budget_test.yml",
        "the plan example: one failed request in 4320 leaves 33.2 of 43.2 minutes",
    ),
}


def _mutated_rules(source: str, text: str, replacement: str, rules_dir: Path) -> Path:
    """Write the rules with one mutation into `rules_dir`; the file that changed."""
    if source == gen_rules.SPEC_FILE.name:
        spec_text = gen_rules.SPEC_FILE.read_text()
        assert text in spec_text, f"mutation no longer applies to {source}"
        spec = gen_rules.Spec.model_validate(yaml.safe_load(spec_text.replace(text, replacement)))
        rules_dir.mkdir(parents=True)
        for name, content in gen_rules.rule_files(spec).items():
            (rules_dir / name).write_text(gen_rules.render(content))
        changed = [
            rules_dir / p.name
            for p in RULES_DIR.glob("*.yml")
            if (rules_dir / p.name).read_text() != p.read_text()
        ]
        assert len(changed) == 1, changed
        return changed[0]
    shutil.copytree(RULES_DIR, rules_dir)
    target = rules_dir / source
    original = target.read_text()
    assert text in original, f"mutation no longer applies to {source}"
    target.write_text(original.replace(text, replacement))
    return target


def _one_group(test_file: str, group: str, folder: Path) -> Path:
    """A copy of `test_file` in `folder`/tests holding only its test group `group`."""
    document = yaml.safe_load((RULE_TESTS_DIR / test_file).read_text())
    document["tests"] = [t for t in document["tests"] if t["name"] == group]
    assert len(document["tests"]) == 1, f"{test_file} has no single group {group!r}"
    (folder / "tests").mkdir(parents=True)
    path = folder / "tests" / test_file
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_promtool_cases_catch_a_wrong_rule(mutation: str, tmp_path: Path) -> None:
    wrong = MUTATIONS[mutation]
    # The chosen case passes against the real rules...
    shutil.copytree(RULES_DIR, tmp_path / "real" / "rules")
    case = _one_group(wrong.test_file, wrong.group, tmp_path / "real")
    result = run("promtool", "test", "rules", case, timeout=120)
    assert result.returncode == 0, result.stdout
    # ... and fails against the mutant.
    changed = _mutated_rules(
        wrong.source, wrong.text, wrong.replacement, tmp_path / "mutant" / "rules"
    )
    result = run("promtool", "check", "rules", changed)
    assert result.returncode == 0, f"the mutant must still be valid: {result.stdout}"
    case = _one_group(wrong.test_file, wrong.group, tmp_path / "mutant")
    result = run("promtool", "test", "rules", case, timeout=120)
    assert result.returncode != 0, f"{wrong.group!r} of {wrong.test_file} did not notice"
    assert "FAILED" in result.stdout + result.stderr
