"""The Prometheus endpoint and what it exports: every role's names from its collector, the endpoint's life,
and ops/grafana-dashboard.json, which must be a Grafana dashboard that asks only for names the code exports."""

from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.metrics_core import Metric

from miles_stream.buffer.replay import BufferCounters
from miles_stream.bus.groups import ConsumeCounters
from miles_stream.bus.streams import reason_kind
from miles_stream.errors import ConfigError
from miles_stream.evaluation.evaluator import EvalCounters
from miles_stream.evaluation.record import EvalResult
from miles_stream.metrics_http import Collect, MetricsConfig, MetricsServer
from miles_stream.redis_server import free_port
from miles_stream.status import exporter
from miles_stream.status.snapshot import GroupStatus, StreamStatus

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana-dashboard.json"


def every_role() -> Collect:
    """Each role's collector over stand-ins holding the counters the real components keep."""
    buffer = BufferCounters(accepted=4, received=5, staleness={0: 3, 2: 1})
    service: Any = SimpleNamespace(progress=SimpleNamespace(step=2, groups=4, version=2, seconds={"step": 1.5},
                                                            last={"publish_s": 0.1, "tokens_per_s": 9.0,
                                                                  "reward_mean": 0.5, "rollout_accuracy": 0.25}),
                                   held=1)  # fmt: skip
    consumer: Any = SimpleNamespace(stream="ns:trajectories", group="trainer", trimmed_unread=0,
                                    dead_letters={"schema": 2})  # fmt: skip
    producer: Any = SimpleNamespace(counters=SimpleNamespace(prompts=3, groups=2, returned=0, recycled=0, resumed=0,
                                                             dead_lettered=0, taken_over=0, dropped_done=0,
                                                             weight_updates=1,
                                                             tokens=40),
                                    in_flight=1)  # fmt: skip
    streams = [StreamStatus("ns:trajectories", 7, (GroupStatus("trainer", 1, 2, 3, "0-0"),))]

    async def read() -> list[StreamStatus]:
        return streams

    return exporter.combine(
        exporter.feeder_metrics(SimpleNamespace(published=8)),  # type: ignore[arg-type]
        exporter.producer_metrics(producer, SimpleNamespace(waits=1)),  # type: ignore[arg-type]
        exporter.trainer_metrics(service, buffer, ConsumeCounters(commits_lost=1)),
        exporter.consumer_metrics("trainer", [consumer]),
        exporter.weight_version_metric("trainer", lambda: 2),
        exporter.recorder_metrics(lambda: 5),
        lambda: exporter.streams_to_metrics(streams),
        exporter.eval_metrics(EvalCounters(evaluated=2, skipped=1, last=LAST_EVAL)),
    )


LAST_EVAL = EvalResult(version=4, evaluator_id="e", dataset="d", prompts=10, n_samples=4, pass_at_1=0.5,
                       pass_at_k={1: 0.4, 4: 0.8}, reward_mean=0.4, greedy_reward_mean=0.5, response_tokens_mean=3.0,
                       truncated_rate=0.1, eval_s=2.0, skipped=1, created_at=0.0)  # fmt: skip


def sample_names(families: list[Metric]) -> set[str]:
    return {s.name for f in families for s in f.samples}


def test_every_exported_name_has_the_prefix_and_a_unit_or_total_where_it_counts() -> None:
    families = list(every_role()())
    names = sample_names(families)
    assert all(n.startswith("miles_stream_") for n in names), names
    counters = {s.name for f in families if f.type == "counter" for s in f.samples}
    assert all(n.endswith("_total") for n in counters), counters
    assert {"miles_stream_stream_lag_entries", "miles_stream_stream_pending_entries",
            "miles_stream_dead_letters_total", "miles_stream_producer_in_flight",
            "miles_stream_producer_tokens_total", "miles_stream_admission_waits_total",
            "miles_stream_trainer_step_seconds_sum", "miles_stream_trainer_wait_seconds_sum",
            "miles_stream_trainer_publish_blocked_seconds_sum", "miles_stream_batch_staleness_versions_bucket",
            "miles_stream_weight_version", "miles_stream_eval_pass_at_1", "miles_stream_eval_pass_at_k",
            "miles_stream_eval_reward_mean", "miles_stream_eval_weight_version",
            "miles_stream_eval_versions_total"} <= names  # fmt: skip


def test_eval_gauges_carry_the_last_result_and_are_absent_before_the_first() -> None:
    families = exporter.eval_metrics(EvalCounters(evaluated=2, skipped=1, last=LAST_EVAL))()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("miles_stream_eval_pass_at_1", ())] == 0.5
    assert samples[("miles_stream_eval_pass_at_k", (("k", "4"),))] == 0.8
    assert samples[("miles_stream_eval_weight_version", ())] == 4
    assert samples[("miles_stream_eval_versions_total", (("outcome", "skipped"),))] == 1
    before = sample_names(list(exporter.eval_metrics(EvalCounters())()))
    assert before == {"miles_stream_eval_versions_total"}


def test_the_staleness_histogram_is_cumulative_over_its_buckets() -> None:
    (family,) = [f for f in every_role()() if f.name == "miles_stream_batch_staleness_versions"]
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert (buckets["0"], buckets["1"], buckets["2"], buckets["+Inf"]) == (3, 3, 4, 4)
    assert {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")} == {
        "miles_stream_batch_staleness_versions_count": 4,
        "miles_stream_batch_staleness_versions_sum": 2,
    }


def test_a_dead_letter_reason_becomes_a_short_label() -> None:
    assert reason_kind("schema: frame too short") == "schema"
    assert reason_kind("delivered 6 times (max_deliveries=5)") == "delivered"
    assert reason_kind("deleted from the stream while pending") == "deleted"
    assert reason_kind("") == "unknown"


def test_the_endpoint_serves_its_own_registry_and_stops() -> None:
    port = free_port()
    server = MetricsServer(MetricsConfig(port=port), lambda: exporter.feeder_metrics(SimpleNamespace(published=3))())  # type: ignore[arg-type]
    server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "miles_stream_feeder_published_total 3.0" in text
        assert "python_gc" not in text  # the library's global collectors are not in this registry
    finally:
        server.stop()
        server.stop()  # idempotent
    with pytest.raises(OSError):  # nothing answers there any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)


def test_port_zero_serves_nothing_and_a_taken_port_names_the_setting() -> None:
    off = MetricsServer(MetricsConfig(), lambda: [])
    off.start()
    assert off.port == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match=r"metrics\.port"):
            MetricsServer(MetricsConfig(port=taken.getsockname()[1]), lambda: []).start()
    with pytest.raises(ConfigError, match=r"metrics\.port"):
        MetricsConfig(port=70000)


def test_the_grafana_dashboard_is_a_dashboard_over_exported_names_only() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["title"], str) and dashboard["title"]
    assert isinstance(dashboard["uid"], str) and 0 < len(dashboard["uid"]) <= 40
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    exported = sample_names(list(every_role()()))
    asked: set[str] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap"}, panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}, panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["refId"] and target["expr"], panel["title"]
            asked |= set(re.findall(r"miles_stream_\w+", target["expr"]))
    assert asked, "the dashboard asks for no miles_stream_ metric"
    assert asked <= exported, f"the dashboard asks for names nothing exports: {sorted(asked - exported)}"
