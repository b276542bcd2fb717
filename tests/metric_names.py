"""The Prometheus series Conclave exposes, and the series names a PromQL query reads.

Alert rules and dashboards are written against names that the processes expose; a
typo there gives an alert that never fires and a panel that stays empty, silently.
:data:`EXPOSED` is the list they are checked against (the exposition names of
prometheus_client: a counter ``x`` is ``x_total``, a histogram ``x`` is ``x_bucket``,
``x_sum`` and ``x_count``).
"""

from __future__ import annotations

import re

__all__ = ["EXPOSED", "series_names"]

_COUNTERS = (
    "conclave_tasks_dispatched",
    "conclave_tasks_completed",
    "conclave_tasks_dead_lettered",
    "conclave_task_retries",
    "conclave_tasks_stalled",
    "conclave_heartbeats_received",
    "conclave_reconnects",
)
_GAUGES = (
    "conclave_queue_depth",
    "conclave_tasks_in_flight",
    "conclave_pool_capacity",
    "conclave_agents",
    "messaging_process_lag_records",
    "conclave_witness_log_size",
    "conclave_witness_checkpoint_age_seconds",
    "conclave_projection_lag_records",
)
_HISTOGRAMS = (
    "conclave_dispatch_latency_seconds",
    "conclave_task_duration_seconds",
    "conclave_projection_batch_size",
)

EXPOSED: frozenset[str] = frozenset(
    {f"{name}_total" for name in _COUNTERS}
    | set(_GAUGES)
    | {f"{name}_{suffix}" for name in _HISTOGRAMS for suffix in ("bucket", "sum", "count")}
    # Prometheus' own series of alerts (pending and firing), read by the dashboard.
    | {"ALERTS"}
)

# Not series: PromQL's keywords and operators spelled as words.
_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "atan2", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENTIFIER = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*+)(?!\s*\()")


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords and
    durations left out).

    >>> sorted(series_names('sum by (pool) (rate(a_total{pool=~"x"}[5m])) > 0 unless b'))
    ['a_total', 'b']
    """
    text = _STRING.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    # `offset 15m`: the duration after offset is no name either
    text = re.sub(r"\boffset\s+-?[\w.]+", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}
