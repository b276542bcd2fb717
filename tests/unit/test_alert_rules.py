"""infra/alerts.yml checked and evaluated by Prometheus' own promtool.

``promtool test rules`` runs the unit tests in infra/alerts.test.yml: sample series,
evaluated by the real rule engine, against the alerts expected at given times. The
tests here add what promtool does not ask for: that every rule is tested both firing
and silent, has a severity and a summary, and that Prometheus loads the file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.metric_names import problems

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
RULES = INFRA / "alerts.yml"
RULE_TESTS = INFRA / "alerts.test.yml"
SEVERITIES = frozenset({"critical", "warning"})


def run(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *map(str, args)],
        cwd=INFRA,  # rule_files in alerts.test.yml and prometheus.yml are relative
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def alerting_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def rule_expectations() -> list[dict[str, Any]]:
    return [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]


def test_promtool_accepts_the_rules(promtool_binary: Path) -> None:
    proc = run(promtool_binary, "check", "rules", RULES)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(alerting_rules())} rules found" in proc.stdout


def test_rules_fire_and_stay_silent_as_the_unit_tests_expect(promtool_binary: Path) -> None:
    proc = run(promtool_binary, "test", "rules", RULE_TESTS)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_loads_the_rules(promtool_binary: Path) -> None:
    config = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    assert RULES.name in config.get("rule_files", []), "prometheus.yml does not load alerts.yml"
    # Also checks every rule file the config names, resolved next to the config.
    proc = run(promtool_binary, "check", "config", INFRA / "prometheus.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_wrong_expectation_fails(promtool_binary: Path, tmp_path: Path) -> None:
    """The harness bites: the same rules against one expectation turned around."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    case = next(c for t in tests["tests"] for c in t.get("alert_rule_test", []) if c["exp_alerts"])
    case["exp_alerts"] = []
    tests["rule_files"] = [str(RULES)]
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(tests))
    proc = run(promtool_binary, "test", "rules", broken)
    assert proc.returncode != 0
    assert case["alertname"] in proc.stdout + proc.stderr


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_every_rule_is_tested_firing_and_silent(rule: dict[str, Any]) -> None:
    cases = [c for c in rule_expectations() if c["alertname"] == rule["alert"]]
    assert any(c["exp_alerts"] for c in cases), f"{rule['alert']} is never expected to fire"
    assert any(not c["exp_alerts"] for c in cases), f"{rule['alert']} is never expected silent"


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_every_rule_has_severity_summary_and_a_hold_time(rule: dict[str, Any]) -> None:
    assert rule.get("labels", {}).get("severity") in SEVERITIES, rule["alert"]
    assert rule.get("annotations", {}).get("summary"), f"{rule['alert']} has no summary"
    assert rule.get("annotations", {}).get("description"), f"{rule['alert']} has no description"
    # A scrape that fails once, a restart, must not page: every rule holds a while.
    assert rule.get("for"), f"{rule['alert']} fires on a single evaluation"


@pytest.mark.parametrize("rule", alerting_rules(), ids=lambda rule: rule["alert"])
def test_every_rule_reads_only_what_conclave_exposes(rule: dict[str, Any]) -> None:
    """A rule over a misspelt metric or label evaluates to nothing, and so never fires."""
    found = problems(rule["expr"])
    assert not found, f"{rule['alert']}: " + "; ".join(found)
