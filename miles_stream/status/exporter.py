"""What each process's Prometheus endpoint (metrics_http.py) serves, read from its components at scrape time.

Every function here returns a `Collect`: the counters the components keep already (the producer's, the
buffer's, the consumers', the trainer's progress), turned into metric families when Prometheus asks. Nothing
is counted twice and there is no loop to stop. Only the trainer's endpoint reads Redis (XINFO GROUPS per
stream, `stream_metrics`), so that a run of many producers does not ask Redis the same question many times.
The names, with their units, are `NAMES`; docs/metrics.md says what each means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import structlog
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from miles_stream.metrics_http import Collect
from miles_stream.status.snapshot import StreamStatus

if TYPE_CHECKING:
    from miles_stream.buffer.replay import BufferCounters
    from miles_stream.bus.groups import ConsumeCounters
    from miles_stream.bus.streams import StreamConsumer
    from miles_stream.evaluation.evaluator import EvalCounters
    from miles_stream.feeder import Feeder
    from miles_stream.rollout.admission import Admission
    from miles_stream.rollout.producer import RolloutProducer
    from miles_stream.trainer.service import TrainerService

log = structlog.get_logger(__name__)

P = "miles_stream_"
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 8, 16)  # versions behind the trainer
SCRAPE_REDIS_S = 2.0  # the most a scrape waits for the trainer's event loop to read the streams


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(P + name, doc, labels=labels)


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(P + name, doc, labels=labels)


def combine(*collects: Collect) -> Collect:
    return lambda: (m for c in collects for m in c())


def consumer_metrics(role: str, consumers: Sequence[StreamConsumer]) -> Collect:
    """Dead letters by reason, and an observer's entries trimmed before it read them, per consumer."""

    def collect() -> Iterator[Metric]:
        dead = _counter("dead_letters_total", "Entries this process moved to {ns}:dead, by reason",
                        ["role", "stream", "group", "reason"])  # fmt: skip
        trimmed = _counter("entries_trimmed_unread_total", "Entries trimmed before this observer read them",
                           ["role", "stream", "group"])  # fmt: skip
        for c in consumers:
            for reason, count in sorted(c.dead_letters.items()):
                dead.add_metric([role, c.stream, c.group, reason], count)
            trimmed.add_metric([role, c.stream, c.group], c.trimmed_unread)
        yield dead
        yield trimmed

    return collect


def weight_version_metric(role: str, version: Callable[[], int]) -> Collect:
    def collect() -> Iterator[Metric]:
        g = _gauge("weight_version", "The policy version this process generates with (producer) or made (trainer)",
                   ["role"])  # fmt: skip
        g.add_metric([role], version())
        yield g

    return collect


def feeder_metrics(feeder: Feeder) -> Collect:
    return lambda: [CounterMetricFamily(P + "feeder_published", "Prompts published to {ns}:prompts",
                                        value=feeder.published)]  # fmt: skip


def recorder_metrics(records: Callable[[], int]) -> Collect:
    return lambda: [CounterMetricFamily(P + "recorder_records", "Trajectory entries written", value=records())]


def eval_metrics(counters: EvalCounters) -> Collect:
    """The evaluator's last result (absent until its first), and how many versions it scored or passed over."""

    def collect() -> Iterator[Metric]:
        events = _counter("eval_versions_total", "Weight versions the evaluator scored, skipped or failed to load",
                          ["outcome"])  # fmt: skip
        for outcome in ("evaluated", "skipped", "rejected"):
            events.add_metric([outcome], getattr(counters, outcome))
        yield events
        r = counters.last
        if r is None:
            return
        yield GaugeMetricFamily(P + "eval_weight_version", "The weight version of the last eval result",
                                value=r.version)  # fmt: skip
        yield GaugeMetricFamily(P + "eval_pass_at_1", "Greedy: share of held-out prompts answered correctly",
                                value=r.pass_at_1)  # fmt: skip
        at_k = _gauge("eval_pass_at_k", "Unbiased pass@k over the n sampled responses per prompt", ["k"])
        for k, v in sorted(r.pass_at_k.items()):
            at_k.add_metric([str(k)], v)
        yield at_k
        for name, value, doc in (("eval_reward_mean", r.reward_mean, "Mean reward of the sampled responses"),
                                 ("eval_response_tokens_mean", r.response_tokens_mean, "Mean response length, tokens"),
                                 ("eval_truncated_ratio", r.truncated_rate, "Responses cut at max_new_tokens"),
                                 ("eval_duration_seconds", r.eval_s, "Wall time of the last evaluation")):  # fmt: skip
            yield GaugeMetricFamily(P + name, doc, value=value)

    return collect


def producer_metrics(producer: RolloutProducer, admission: Admission) -> Collect:
    def collect() -> Iterator[Metric]:
        c = producer.counters
        yield GaugeMetricFamily(P + "producer_in_flight", "Groups being made now (claimed, not yet published)",
                                value=producer.in_flight)  # fmt: skip
        yield CounterMetricFamily(P + "producer_tokens", "Response tokens sampled (rate: tokens/s)", value=c.tokens)
        events = _counter("producer_events_total", "Producer events: prompts claimed, groups published, ...",
                          ["event"])  # fmt: skip
        for event in ("prompts", "groups", "returned", "recycled", "resumed", "dead_lettered", "taken_over",
                      "dropped_done", "weight_updates"):  # fmt: skip
            events.add_metric([event], getattr(c, event))
        yield events
        yield CounterMetricFamily(P + "admission_waits", "Times a start waited for room in the run's budget",
                                  value=admission.waits)  # fmt: skip

    return collect


def trainer_metrics(service: TrainerService, buffer: BufferCounters, consumer: ConsumeCounters | None) -> Collect:
    def collect() -> Iterator[Metric]:
        p = service.progress
        yield CounterMetricFamily(P + "trainer_steps", "Training steps", value=p.step)
        yield CounterMetricFamily(P + "trainer_groups", "Groups trained", value=p.groups)
        yield GaugeMetricFamily(P + "trainer_held_groups", "Groups trained, not yet committed", value=service.held)
        for phase, doc in (("step", "A step: train, publish, commit"), ("wait", "Waiting for a batch"),
                           ("publish_blocked", "The step blocked on snapshotting weights to publish")):  # fmt: skip
            yield SummaryMetricFamily(P + f"trainer_{phase}_seconds", doc, count_value=p.step,
                                      sum_value=p.seconds.get(phase, 0.0))  # fmt: skip
        for key, name, doc in (("publish_s", "trainer_publish_seconds", "The last weight publication (background)"),
                               ("tokens_per_s", "trainer_tokens_per_second", "The last step's training tokens/s"),
                               ("reward_mean", "trainer_reward_mean", "The last batch's mean reward"),
                               ("rollout_accuracy", "trainer_rollout_accuracy",
                                "Samples with reward >= 1 among those read since the previous step")):  # fmt: skip
            if key in p.last:
                yield GaugeMetricFamily(P + name, doc, value=p.last[key])
        outcomes = _counter("buffer_groups_total", "Groups the buffer read, and what became of them", ["outcome"])
        for outcome in ("received", "accepted", "stale_dropped", "recycled"):
            outcomes.add_metric([outcome], getattr(buffer, outcome))
        outcomes.add_metric(["filtered"], sum(buffer.filtered.values()))
        yield outcomes
        yield _staleness(buffer.staleness)
        if consumer is not None:
            yield CounterMetricFamily(P + "trainer_commits_lost", "Commits Redis lost (a host crash), made again",
                                      value=consumer.commits_lost)  # fmt: skip

    return collect


def _staleness(counts: dict[int, int]) -> HistogramMetricFamily:
    buckets = [(str(le), sum(n for s, n in counts.items() if s <= le)) for le in STALENESS_BUCKETS]
    total = sum(counts.values())
    return HistogramMetricFamily(P + "batch_staleness_versions", "Trainer version minus a group's oldest token "
                                 "version, per group trained", buckets=[*buckets, ("+Inf", total)],
                                 sum_value=sum(s * n for s, n in counts.items()))  # fmt: skip


def stream_metrics(read: Callable[[], Awaitable[Sequence[StreamStatus]]], loop: asyncio.AbstractEventLoop) -> Collect:
    """Length of each stream, pending and lag per consumer group: `read()` runs on the process's event loop
    (its Redis client lives there); a scrape that cannot get an answer in SCRAPE_REDIS_S leaves them out."""

    def collect() -> Iterator[Metric]:
        try:
            streams = asyncio.run_coroutine_threadsafe(_call(read), loop).result(timeout=SCRAPE_REDIS_S)
        except Exception as exc:  # Redis away, or the loop busy or closing: this scrape goes without them
            log.debug("metrics_streams_unread", error=repr(exc))
            return
        yield from streams_to_metrics(streams)

    return collect


async def _call(read: Callable[[], Awaitable[Sequence[StreamStatus]]]) -> Sequence[StreamStatus]:
    return await read()


def streams_to_metrics(streams: Iterable[StreamStatus]) -> Iterator[Metric]:
    length = _gauge("stream_length_entries", "Entries in the stream", ["stream"])
    pending = _gauge("stream_pending_entries", "Entries delivered to the group, not acked", ["stream", "group"])
    lag = _gauge("stream_lag_entries", "Entries not yet delivered to the group (Redis 7+)", ["stream", "group"])
    for s in streams:
        length.add_metric([s.key], s.length)
        for g in s.groups:
            pending.add_metric([s.key, g.name], g.pending)
            if g.lag is not None:
                lag.add_metric([s.key, g.name], g.lag)
    yield from (length, pending, lag)
