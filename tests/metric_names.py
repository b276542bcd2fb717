"""The Prometheus series Conclave exposes, and what a PromQL query reads of them.

Alert rules and dashboards are written against names and labels that the processes
expose; a typo there gives an alert that never fires and a panel that stays empty,
silently. :data:`EXPOSED` is taken from conclave/metrics.py itself (its counters and
histograms, and the gauges its probes serve), in prometheus_client's exposition
names: a counter ``x`` is ``x_total``, a histogram ``x`` is ``x_bucket``, ``x_sum``
and ``x_count``. So a metric renamed there fails the tests of infra/ here.
"""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from conclave import metrics

__all__ = ["EXPOSED", "TARGET_LABELS", "problems", "series_names"]

# Labels Prometheus adds to every scraped series (infra/prometheus.yml relabels `service`).
TARGET_LABELS = frozenset({"instance", "job", "service"})


def _exposed() -> dict[str, frozenset[str]]:
    found: dict[str, frozenset[str]] = {
        name: frozenset(labels) for name, (_, labels) in metrics.GAUGES.items()
    }
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = frozenset(metric._labelnames)
        for family in metric.describe():
            if family.type == "counter":
                found[f"{family.name}_total"] = labels
            elif family.type == "histogram":
                found[f"{family.name}_bucket"] = labels | {"le"}
                found[f"{family.name}_sum"] = labels
                found[f"{family.name}_count"] = labels
            else:
                found[family.name] = labels
    # Prometheus' own series of alerts (pending and firing), read by the dashboard.
    found["ALERTS"] = frozenset({"alertname", "alertstate", "severity"})
    return found


EXPOSED: dict[str, frozenset[str]] = _exposed()
"""Series name -> its label names (without the target labels)."""

# Not series: PromQL's keywords and operators spelled as words.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*+)(?!\s*\()")
_SELECTOR = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*+)\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords and
    durations left out).

    >>> sorted(series_names('sum by (pool) (rate(a_total{pool=~"x"}[5m])) > 0 unless b'))
    ['a_total', 'b']
    """
    text = _MATCHERS.sub(" ", _STRING.sub('""', expr))
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    # `offset 15m`: the duration after offset is no name either
    text = re.sub(r"\boffset\s+-?[\w.]+", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names it matches on) of every ``name{...}`` selector."""
    return [
        (name, set(_MATCHER_LABEL.findall(_STRING.sub('""', matchers))))
        for name, matchers in _SELECTOR.findall(expr)
    ]


def by_labels(expr: str) -> set[str]:
    """Label names in ``by``, ``without``, ``on``, ``ignoring`` and ``group_*`` clauses."""
    return {
        label.strip()
        for _, labels in _GROUPING.findall(_STRING.sub('""', expr))
        for label in labels.split(",")
        if label.strip()
    }


def problems(expr: str) -> list[str]:
    """What in ``expr`` Conclave does not expose: series names, labels matched on a
    series, labels grouped by that no series of the expression has."""
    found = [
        f"reads {name}, which is not exposed" for name in sorted(series_names(expr) - set(EXPOSED))
    ]
    for name, labels in selectors(expr):
        unknown = labels - EXPOSED.get(name, labels) - TARGET_LABELS
        found += [
            f"matches {name} on {label}, a label it does not have" for label in sorted(unknown)
        ]
    known = TARGET_LABELS.union(*(EXPOSED.get(name, frozenset()) for name in series_names(expr)))
    found += [
        f"groups by {label}, a label none of its series has"
        for label in sorted(by_labels(expr) - known)
    ]
    return found
