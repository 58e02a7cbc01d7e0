"""A run's streams in partitions (`bus.partitions`): 3 on a 3-primary Redis Cluster on loopback (each partition on
a primary of its own), 2 on one server (the hash tags are harmless there).

    feed -> produce -> train   every prompt fed to partition (position mod N), each partition's position resumed
                               exactly, every group published into its prompt's partition, committed exactly once
    hand-back                  a producer stopped mid-generation hands its prompt back to its own partition; one
                               that died (never acks) has its prompts taken over there; all committed once
    fencing                    a trainer whose lease passed to another commits nothing in any partition; a fence
                               lost from a partition (a failover) is put back only by the holder of the last token

In process, the pieces built as `miles-stream feed/produce/train` build them (producers/, consumers/), with an
engine that answers at once (tests/instant_engine.py): the bus is what is checked.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from instant_engine import ByteTokenizer, HangingEngine, InstantEngine, constant_reward

from consumers.trainer import _take_lease
from miles_stream import admin
from miles_stream.bus import GroupConsumer, GroupPublisher, Keys, StreamConsumer, connect, open_stream_client
from miles_stream.bus.backpressure import Backpressure
from miles_stream.bus.blobs import blobs_for, first_entry_ms, put_ms
from miles_stream.bus.connection import RetryPolicy
from miles_stream.bus.done import done_count
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.lease import Lease, PartitionFence
from miles_stream.bus.partitioned import PartitionedConsumer, close_partition_clients, partition_clients
from miles_stream.codec import GroupCodec
from miles_stream.errors import LeaseLostError, MilesStreamError
from miles_stream.feeder import Feeder, FeederConfig, load_rows
from miles_stream.prompts import decode_prompt
from miles_stream.record import RecordingWriter, read_recording, recording_files
from miles_stream.record.recorder import record_partitions
from miles_stream.redis_cluster import LocalCluster
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.rollout.config import RolloutConfig
from miles_stream.rollout.partials import group_id
from miles_stream.rollout.producer import Lane, RolloutProducer
from miles_stream.run_config import RunConfig, load_run_config
from miles_stream.status.snapshot import namespace_status
from miles_stream.testing.synthetic import synthetic_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
DEADLINE_S = 60.0


@dataclass
class Server:
    url: str
    partitions: int
    cluster: LocalCluster | None = None


@pytest.fixture(scope="module", params=["cluster", "single"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    if request.param == "cluster":
        with LocalCluster(primaries=3) as cluster:
            yield Server(cluster.url, 3, cluster)
    else:
        with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as single:
            yield Server(single.url, 2)


def spread_namespace(server: Server) -> str:
    """A hash-tag namespace whose partitions each sit on a primary of their own (on the cluster)."""
    while True:
        ns = "{p" + uuid.uuid4().hex[:8] + "}"
        if server.cluster is None:
            return ns
        nodes = {server.cluster.primary_of(k.trajectories) for k in partition_keys(ns, server.partitions)}
        if len(nodes) == server.partitions:
            return ns


@dataclass
class Run:
    """One partitioned namespace and the clients a process of it opens."""

    config: RunConfig
    main: aioredis.Redis
    clients: list[aioredis.Redis]
    blocking: Any
    data: Any
    closers: list[Any] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.config.bus.namespace)

    @property
    def parts(self) -> tuple[Keys, ...]:
        return partition_keys(self.config.bus.namespace, self.config.bus.partitions)

    @property
    def lanes(self) -> list[tuple[aioredis.Redis, Keys]]:
        return list(zip(self.clients, self.parts, strict=True))

    async def feed(self, path: Path, stop: asyncio.Event | None = None, max_queued: int = 1000) -> int:
        config = FeederConfig(path=str(path), max_queued=max_queued)
        return await Feeder(self.main, self.keys, self.config.bus, config, load_rows(config), self.lanes).run(stop)

    def producer(self, name: str, engine: Any) -> RolloutProducer:
        """As producers/rollout.py builds one: a lane per partition."""
        bus = self.config.bus
        lanes = [Lane(k, *(StreamConsumer(c, self.blocking, stream=s, group="producers", consumer=name,
                                          dead_stream=k.dead, config=bus) for s in (k.prompts,)),
                      GroupPublisher(self.data, k.trajectories, bus, backpressure=Backpressure(c, k.trajectories, bus)),
                      StreamConsumer(c, self.blocking, stream=k.partials, group="producers", consumer=name,
                                     dead_stream=k.dead, config=bus))
                 for c, k in self.lanes]  # fmt: skip
        config = RolloutConfig(model="none", producer_id=name, n_samples_per_prompt=2, max_inflight_prompts=2)
        return RolloutProducer(config, engine=engine, tokenizer=ByteTokenizer(), reward_fn=constant_reward,
                               prompts=lanes[0].prompts, partials=lanes[0].partials, publisher=lanes[0].publisher,
                               lanes=lanes)  # fmt: skip

    def trainer(self, name: str, lease: Lease) -> PartitionedConsumer:
        """As consumers/trainer.py builds one: a consumer per partition, each fenced by the lease's copy there."""
        groups = []
        for p, (c, k) in enumerate(self.lanes):
            stream = StreamConsumer(c, self.blocking, stream=k.trajectories, group="trainer", consumer=name,
                                    dead_stream=k.dead, config=self.config.bus)  # fmt: skip
            group = GroupConsumer(stream, k, owns_prompts=True, partition=p)
            group.fence = PartitionFence(lease, c, k.namespace)
            groups.append(group)
        return PartitionedConsumer(groups, range(len(groups)))

    async def take_lease(self, name: str, ttl_s: float = 30.0, wait_s: float = 0.0) -> Lease:
        lease = Lease(self.main, self.keys, "trainer", name, ttl_s=ttl_s)
        await lease.acquire(wait_s)
        for c, k in self.lanes:  # before the trainer reads: consumers/trainer.py `_take_lease`
            await PartitionFence(lease, c, k.namespace).install()
        return lease

    async def done(self) -> list[int]:
        return [await done_count(c, k.done("trainer")) for c, k in self.lanes]

    async def pending(self, stream: str, group: str, client: aioredis.Redis) -> int:
        return int((await client.xpending(stream, group))["pending"])


@pytest.fixture
async def run(server: Server) -> AsyncIterator[Run]:
    ns = spread_namespace(server)
    config = load_run_config(None, [f"redis.url={server.url}", f"bus.namespace={ns}",
                                    f"bus.partitions={server.partitions}", "bus.block_ms=50",
                                    "bus.claim_idle_ms=400", "bus.claim_interval_s=0.0"])  # fmt: skip
    main = connect(config.redis)
    clients = partition_clients(config.redis, partition_keys(ns, server.partitions), main)
    blocking = open_stream_client(config.redis, block_ms=config.bus.block_ms)
    data = open_stream_client(config.redis)
    yield Run(config, main, clients, blocking, data)
    await close_partition_clients(clients, main)
    for c in (blocking, data, main):
        await c.aclose()


def dataset(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "label": str(2 * i)}) + "\n" for i in range(n)))
    return path


async def fed_to(run: Run) -> dict[str, int]:
    """Group id -> the partition its prompt entry is on (read before any producer acks and trims them)."""
    out = {}
    for p, (c, k) in enumerate(run.lanes):
        for _, fields in await c.xrange(k.prompts):
            out[group_id(decode_prompt(fields[b"d"]))] = p
    return out


async def train_until(consumer: PartitionedConsumer, want: int, got: list[Any]) -> None:
    await consumer.start()
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < want:
        assert time.monotonic() < deadline, f"only {len(got)} of {want} groups trained within {DEADLINE_S}s"
        items = await consumer.read(8)
        await consumer.commit(items)
        got += items


async def produce(producers: Sequence[RolloutProducer], stop: asyncio.Event) -> list[asyncio.Task[None]]:
    return [asyncio.create_task(p.run(stop)) for p in producers]


async def account(run: Run, fed: dict[str, int], got: Sequence[Any]) -> None:
    """Every prompt trained once, in the partition it was fed to; nothing left pending, no prompt record left."""
    assert sorted(r.group_id for r in got) == sorted(fed)  # each once, none missing
    assert all(r.partition == fed[r.group_id] for r in got)  # published into its prompt's partition
    per_partition = [sum(1 for p in fed.values() if p == q) for q in range(len(run.parts))]
    assert await run.done() == per_partition
    for c, k in run.lanes:
        assert await run.pending(k.prompts, "producers", c) == 0
        assert await run.pending(k.trajectories, "trainer", c) == 0
        assert await c.hlen(k.prompt_of) == 0
        assert await c.xlen(k.dead) == 0


async def test_feed_produce_train_commits_every_prompt_once_in_its_partition(run: Run, tmp_path: Path) -> None:
    n, parts = 30, len(run.parts)
    path = dataset(tmp_path / "d.jsonl", n)
    stop_feeding = asyncio.Event()  # the first feeder fills each partition's share of max_queued, then is stopped
    first = asyncio.create_task(run.feed(path, stop_feeding, max_queued=2 * parts))
    deadline = time.monotonic() + DEADLINE_S
    while sum([await c.xlen(k.prompts) for c, k in run.lanes]) < 2 * parts:
        assert time.monotonic() < deadline, "the feeder did not publish its first prompts"
        await asyncio.sleep(0.01)
    stop_feeding.set()
    assert await first == 2 * parts  # position i to partition i mod N: two each, then each partition was full
    assert [await c.xlen(k.prompts) for c, k in run.lanes] == [2] * parts
    stop = asyncio.Event()
    tasks = await produce([run.producer("a", InstantEngine(seed=1)), run.producer("b", InstantEngine(seed=2))], stop)
    second = asyncio.create_task(run.feed(path))  # resumes each partition where the first stopped
    got: list[Any] = []
    try:
        await train_until(run.trainer("t0", await run.take_lease("t0")), n, got)
        assert await second == n - 2 * parts
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert await run.feed(path) == 0  # a third finds every partition's epoch done
    fed = {r.group_id: r.partition for r in got}
    entries = {group_id(decode_prompt(f[b"d"])) for c, k in run.lanes for _, f in await c.xrange(k.prompts)}
    assert len(fed) == n and entries <= set(fed)
    sizes = [sum(1 for p in fed.values() if p == q) for q in range(parts)]
    assert max(sizes) - min(sizes) <= 1  # position i of the epoch's order to partition i mod N
    await account(run, fed, got)
    status = await namespace_status(run.main, run.keys, 10.0, run.lanes)
    assert status.done_groups == {"trainer": n}  # summed over the partitions
    assert {s.key for s in status.streams} >= {k.trajectories for k in run.parts}  # listed per partition


async def test_prompts_return_to_their_own_partition(run: Run, tmp_path: Path) -> None:
    """A producer stopped mid-generation hands its prompts back to their own partitions' prompt streams; a
    producer that died holding a prompt of each partition has them taken over there. Every one trained once."""
    n = 12
    assert await run.feed(dataset(tmp_path / "d.jsonl", n)) == n
    fed = await fed_to(run)
    for c, k in run.lanes:  # "dead" claims one prompt of each partition and never acks it (kill -9)
        dead = StreamConsumer(c, run.blocking, stream=k.prompts, group="producers", consumer="dead",
                              dead_stream=k.dead, config=run.config.bus)  # fmt: skip
        await dead.start()
        assert len(await dead.read(1)) == 1
    hanging = HangingEngine()
    stopped = run.producer("stopped", hanging)
    stop = asyncio.Event()
    (task,) = await produce([stopped], stop)
    deadline = time.monotonic() + DEADLINE_S
    while hanging.calls < 2:  # max_inflight_prompts: two prompts in the engine
        assert time.monotonic() < deadline, "the producer claimed no prompt"
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert stopped.counters.returned == 2
    returned: dict[str, list[int]] = {}
    for p, (c, k) in enumerate(run.lanes):  # nothing trimmed: "dead" holds the oldest entry of each partition
        entries = await c.xrange(k.prompts)
        for _, fields in entries[sum(1 for q in fed.values() if q == p) :]:
            returned.setdefault(group_id(decode_prompt(fields[b"d"])), []).append(p)
    assert len(returned) == 2 and all(ps == [fed[g]] for g, ps in returned.items())
    stop = asyncio.Event()
    tasks = await produce([run.producer("live", InstantEngine())], stop)
    got: list[Any] = []
    try:
        await train_until(run.trainer("t0", await run.take_lease("t0")), n, got)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    await account(run, fed, got)


async def test_a_stale_trainer_commits_nothing_in_any_partition(run: Run) -> None:
    rng = np.random.default_rng(0)
    per = 3
    for p, (_, k) in enumerate(run.lanes):
        publisher = GroupPublisher(run.data, k.trajectories, run.config.bus)
        for i in range(per):
            await publisher.publish(synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50,
                                                    group_id=f"g{p}-{i}", prompt_key=str(i)))  # fmt: skip
    want = per * len(run.parts)
    old = await run.take_lease("old", ttl_s=0.5)  # never renewed: it lapses, as a frozen trainer's does
    stale = run.trainer("old", old)
    held: list[Any] = []
    await stale.start()
    deadline = time.monotonic() + DEADLINE_S
    while len(held) < want:
        assert time.monotonic() < deadline
        held += await stale.read(8)
    new = await run.take_lease("new", ttl_s=2.0, wait_s=10.0)  # waits out the old lease (polls every ttl/4),
    # then installs its token in every partition
    assert new.token == old.token + 1
    with pytest.raises(LeaseLostError, match="is now new"):
        await stale.commit(held)
    assert await run.done() == [0] * len(run.parts)  # nothing applied in any partition
    assert [await run.pending(k.trajectories, "trainer", c) for c, k in run.lanes] == [per] * len(run.parts)
    got: list[Any] = []
    fresh = run.trainer("new", new)
    await train_until(fresh, want, got)  # takes the old trainer's entries over once idle, commits them
    assert sorted(r.group_id for r in got) == sorted(f"g{p}-{i}" for p in range(len(run.parts)) for i in range(per))
    assert await run.done() == [per] * len(run.parts)
    # A fence lost from a partition (a failover to a replica that had not received it) is put back by the holder
    # of the lease, in its next commit there; never by an older holder.
    (c0, k0), (c1, k1) = run.lanes[0], run.lanes[1]
    fence0, fence1 = (f"{k.namespace}:lease:trainer:fence" for k in (k0, k1))
    for c, fence in ((c0, fence0), (c1, fence1)):
        await c.delete(fence)
    old.lost = None  # as if its process had not noticed: the refusals below are Redis's word, not this flag's
    with pytest.raises(LeaseLostError, match="is now new"):
        await PartitionFence(old, c0, k0.namespace).fenced(lambda pipe: pipe.set(f"{k0.namespace}:x", 1))
    assert not await c0.exists(f"{k0.namespace}:x")
    assert await PartitionFence(new, c1, k1.namespace).fenced(lambda pipe: pipe.set(f"{k1.namespace}:x", 1)) == [True]
    assert await c1.get(fence1) == new.value
    # A fence rolled back to the old holder's value (p0's failover lost the new holder's install): the old holder
    # still finds the lease key naming another, and applies nothing.
    await c0.set(fence0, old.value)
    old.lost = None
    with pytest.raises(LeaseLostError, match="is now new"):
        await PartitionFence(old, c0, k0.namespace).fenced(lambda pipe: pipe.set(f"{k0.namespace}:x", 1))
    assert not await c0.exists(f"{k0.namespace}:x")
    # A token drawn twice (the run's slot failed over and lost the draw of `new`'s token, then `twin` drew it):
    # the fences hold `new`'s value with the token `twin` holds; `twin` installs its own, `new` is refused.
    twin = Lease(run.main, run.keys, "trainer", "twin", ttl_s=30.0)
    twin.token, twin.value = new.token, f'{new.token} {{"holder": "twin"}}'.encode()
    await run.main.set(new.key, twin.value)
    with pytest.raises(LeaseLostError, match="is now"):
        await PartitionFence(new, c1, k1.namespace).fenced(lambda pipe: pipe.set(f"{k1.namespace}:y", 1))
    assert not await c1.exists(f"{k1.namespace}:y")
    assert await PartitionFence(twin, c1, k1.namespace).fenced(lambda pipe: pipe.set(f"{k1.namespace}:y", 1)) == [True]
    assert await c1.get(fence1) == twin.value
    # The run's slot rolled back to the old holder's lease while a partition kept a newer token: refused there.
    await run.main.set(old.key, old.value)
    old.lost = None
    with pytest.raises(LeaseLostError, match="fenced off"):
        await PartitionFence(old, c1, k1.namespace).fenced(lambda pipe: pipe.set(f"{k1.namespace}:z", 1))
    assert not await c1.exists(f"{k1.namespace}:z")


@dataclass
class TwoRanks:
    """A DataParallel of two ranks seen from one (`gather` answers for the other as `other` says)."""

    rank: int
    other: Any = None
    gathered: list[Any] = field(default_factory=list)
    world: int = 2

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        self.gathered.append(obj)
        return [obj, self.other] if self.rank == 0 else [self.other, obj]


async def test_a_lease_rank_0_cannot_fence_in_is_given_up_and_every_rank_is_told(run: Run) -> None:
    """Rank 0 fenced off at the install (a partition holds a newer token) stops renewing and raises, and the rank
    waiting for its word in the collective raises too, instead of waiting there for the launcher."""
    c1, k1 = run.lanes[1]
    await c1.set(f"{k1.namespace}:lease:trainer:fence", "99 {}")
    config = replace(run.config, trainer=replace(run.config.trainer, standby_s=0.0))
    retry = RetryPolicy(attempts=0, max_delay_s=0.5)
    rank0 = TwoRanks(0)
    with pytest.raises(LeaseLostError, match="fenced off"):
        await _take_lease(config, rank0, run.main, run.keys, "t0", asyncio.Event(), retry, run.clients, run.parts)
    (kind, said) = rank0.gathered[0]
    assert kind == "failed" and "fenced off" in said
    rank1 = TwoRanks(1, other=rank0.gathered[0])
    with pytest.raises(MilesStreamError, match=r"rank 0 could not take the trainer lease: .*fenced off"):
        await _take_lease(config, rank1, run.main, run.keys, "t1", asyncio.Event(), retry, run.clients, run.parts)


async def test_a_blob_sweep_keeps_the_blobs_any_partition_still_names(run: Run, tmp_path: Path) -> None:
    """The partitions share one blob store: a trainer's sweep deletes only blobs older than the oldest entry of
    every partition's trajectory stream, not of the one it just committed in."""
    bus = replace(run.config.bus, blob_store=f"file://{tmp_path}", blob_threshold_bytes=1, blob_grace_s=1.0)
    rng = np.random.default_rng(0)
    (_, k0), (c1, k1) = run.lanes[0], run.lanes[1]
    store = blobs_for(bus)
    assert store is not None

    def group(name: str) -> Any:
        return synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id=name, prompt_key="0")

    await GroupPublisher(run.data, k0.trajectories, bus).publish(group("a"))  # partition 0: not trained yet
    (blob_a,) = [put_ms(n) or 0 for n in await store.store.names()]
    deadline = time.monotonic() + DEADLINE_S
    while int((await c1.time())[0] * 1000 + (await c1.time())[1] / 1000) < blob_a + 1100:  # past its grace
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await GroupPublisher(run.data, k1.trajectories, bus).publish(group("b"))
    groups = [GroupConsumer(StreamConsumer(c, run.blocking, stream=k.trajectories, group="trainer", consumer="t",
                                           dead_stream=k.dead, config=bus), k, partition=p)
              for p, (c, k) in enumerate(run.lanes)]  # fmt: skip
    PartitionedConsumer(groups, range(len(groups)))
    await groups[1].start()
    await groups[1].commit(await groups[1].read(8))  # partition 1 trained b and trimmed it: it is empty
    assert await c1.xlen(k1.trajectories) == 0
    assert await first_entry_ms(c1, k1.trajectories) - 1000 > blob_a  # by partition 1 alone, a's blob is garbage
    assert groups[1].blobs is not None
    assert await groups[1].blobs.sweep(c1, k1.trajectories, *groups[1].blob_peers) == 0
    assert len(await store.store.names()) == 2  # a's blob kept: partition 0 still names it


async def test_a_partition_without_entries_does_not_stop_the_blob_sweep(run: Run, tmp_path: Path) -> None:
    """The other partitions never had an entry (fewer groups than partitions so far): the sweep still deletes a
    blob whose entry every group acked once a newer entry follows it, rather than waiting on the idle ones."""
    bus = replace(run.config.bus, blob_store=f"file://{tmp_path}", blob_threshold_bytes=1, blob_grace_s=1.0)
    rng = np.random.default_rng(0)
    c0, k0 = run.lanes[0]
    store = blobs_for(bus)
    assert store is not None
    publisher = GroupPublisher(run.data, k0.trajectories, bus)
    await publisher.publish(synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id="a",
                                            prompt_key="0"))  # fmt: skip
    (blob_a,) = [put_ms(n) or 0 for n in await store.store.names()]
    deadline = time.monotonic() + DEADLINE_S
    while int((await c0.time())[0] * 1000 + (await c0.time())[1] / 1000) < blob_a + 1100:  # past its grace
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await publisher.publish(synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id="c",
                                            prompt_key="1"))  # fmt: skip
    groups = [GroupConsumer(StreamConsumer(c, run.blocking, stream=k.trajectories, group="trainer", consumer="t",
                                           dead_stream=k.dead, config=bus), k, partition=p)
              for p, (c, k) in enumerate(run.lanes)]  # fmt: skip
    PartitionedConsumer(groups, range(len(groups)))
    await groups[0].start()
    first = await groups[0].read(1)
    assert [r.group_id for r in first] == ["a"]
    await groups[0].commit(first)  # a trained, acked and trimmed; c is the oldest entry of partition 0
    assert [await c.exists(k.trajectories) for c, k in run.lanes[1:]] == [0] * (len(run.lanes) - 1)
    assert groups[0].blobs is not None
    assert await groups[0].blobs.sweep(c0, k0.trajectories, *groups[0].blob_peers) == 1
    assert [put_ms(n) for n in await store.store.names()] != [blob_a]  # c's blob is the one left
    assert len(await store.store.names()) == 1


async def test_a_partitioned_run_is_recorded_per_partition_and_replayed_by_group_id(run: Run, tmp_path: Path) -> None:
    """The recorder records every partition's stream into files of its own, byte for byte; a replay into a
    partitioned namespace puts each group in the partition its group id hashes to, so a group recorded twice
    lands twice in one partition (where its second copy is dropped, as in one stream)."""
    rng = np.random.default_rng(0)
    sent: list[list[bytes]] = []
    for p, (c, k) in enumerate(run.lanes):
        publisher = GroupPublisher(run.data, k.trajectories, run.config.bus)
        for i in range(3):
            await publisher.publish(synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50,
                                                    group_id=f"g{p}-{i}", prompt_key=str(i)))  # fmt: skip
        sent.append([fields[b"d"] for _, fields in await c.xrange(k.trajectories)])
    again = GroupPublisher(run.data, run.parts[0].trajectories, run.config.bus)  # a second copy of g0-0
    await again.publish(synthetic_group(np.random.default_rng(0), n_samples=2, prompt_len=4, response_len=4,
                                        vocab=50, group_id="g0-0", prompt_key="0"))  # fmt: skip
    sent[0].append((await run.lanes[0][0].xrange(run.parts[0].trajectories))[-1][1][b"d"])
    out = tmp_path / "rec"
    streams = [StreamConsumer(c, open_stream_client(run.config.redis, block_ms=50), stream=k.trajectories,
                              group="recorder", consumer="r", dead_stream=k.dead, config=run.config.bus, observer=True)
               for c, k in run.lanes]  # fmt: skip
    writers = [RecordingWriter(out, namespace=k.namespace, stream=k.trajectories) for k in run.parts]
    stop = asyncio.Event()
    recording = asyncio.create_task(record_partitions(streams, writers, stop))
    deadline = time.monotonic() + DEADLINE_S
    while sum(w.records for w in writers) < sum(len(s) for s in sent):
        assert time.monotonic() < deadline and not recording.done()
        await asyncio.sleep(0.05)
    stop.set()
    assert await recording == sum(len(s) for s in sent)
    for s in streams:
        await s.blocking.aclose()
    for k, want in zip(run.parts, sent, strict=True):  # each partition's entries in its own files, in order
        files = recording_files([out])
        mine = [f for f in files if f.name.startswith(f"{k.namespace}-")]
        assert mine and [r for f in mine for r in read_recording(f)] == want
    other = spread_namespace(Server(run.config.redis.url, len(run.parts)))  # another run, as many partitions
    target = load_run_config(None, [f"redis.url={run.config.redis.url}", f"bus.namespace={other}",
                                    f"bus.partitions={len(run.parts)}"])  # fmt: skip
    said = await admin.replay_files(target, [str(out)], 0.0)
    assert said.startswith(f"replayed {sum(len(s) for s in sent)} groups")
    codec = GroupCodec()
    where: dict[str, list[int]] = {}
    reader, theirs = connect(target.redis), partition_keys(other, len(run.parts))
    readers = partition_clients(target.redis, theirs, reader)  # each pinned to its partition's slot
    for p, (c, k) in enumerate(zip(readers, theirs, strict=True)):
        for _, fields in await c.xrange(k.trajectories):
            where.setdefault(codec.decode(fields[b"d"]).group_id, []).append(p)
    await close_partition_clients(readers, reader)
    await reader.aclose()
    assert sorted(where) == sorted(f"g{p}-{i}" for p in range(len(run.parts)) for i in range(3))
    assert len(where["g0-0"]) == 2 and len(set(where["g0-0"])) == 1  # both copies in one partition
    assert len({p for ps in where.values() for p in ps}) > 1  # spread over the partitions


async def test_a_commit_after_the_lease_expired_unclaimed_takes_it_again_with_its_token(run: Run) -> None:
    """Redis away past the ttl, nobody else took the lease: a commit that comes before the renewal takes it again
    (the same token and value, so every partition's fence still matches), as the renewal would; the lease is not
    lost. Once another holder drew a token, the same commit is refused."""
    lease = await run.take_lease("t0")
    (c0, k0), (c1, k1) = run.lanes[0], run.lanes[1]
    before = lease.value
    await run.main.delete(lease.key)  # expired, nobody took it
    assert await PartitionFence(lease, c0, k0.namespace).fenced(lambda pipe: pipe.set(f"{k0.namespace}:x", 1)) == [True]
    assert lease.lost is None and lease.value == before and await run.main.get(lease.key) == before
    await run.main.delete(lease.key)
    assert await lease.fenced(lambda pipe: pipe.set(f"{run.keys.namespace}:x", 1)) == [True]  # the one-slot fence too
    await run.main.delete(lease.key)
    other = await run.take_lease("t1")  # expired, and another drew a newer token and took it
    with pytest.raises(LeaseLostError, match="is now t1"):
        await PartitionFence(lease, c1, k1.namespace).fenced(lambda pipe: pipe.set(f"{k1.namespace}:y", 1))
    assert not await c1.exists(f"{k1.namespace}:y") and other.token == lease.token + 1
