"""The bus on a Redis Cluster (3 primaries on loopback, tests/redis_cluster.py): a run whose namespace is a hash
tag keeps every key in one slot, so its transactions (commit, fencing, done-set sweep) run as on one server; the
control client is redis-py's cluster client, the data plane routes by slot and follows MOVED and ASK when the
slot moves; a url or a namespace that does not fit a cluster is refused in one line.

Valkey 8 in the default tier, Debian's Redis 7.0 with -m slow. The whole-process tests on a cluster (the pipeline,
the ACL user, a producer's kill -9, a failover) are in tests/faults/test_cluster_processes.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis
import redis.asyncio
from redis_acl import ACL_RULES, CLUSTER_ACL_RULES
from redis_groups import done_total, publish_groups
from redis_tiers import TierMissing, tier_binary

from miles_stream import admin
from miles_stream.bus import (
    BusConfig,
    GroupConsumer,
    Keys,
    RedisConfig,
    RetryPolicy,
    StreamConsumer,
    connect,
    open_stream_client,
)
from miles_stream.bus.connection import ClusterUrl, parse_cluster_url, wait_until_reachable
from miles_stream.bus.lease import Lease
from miles_stream.errors import ConfigError, RedisUnavailableError
from miles_stream.redis_cluster import LocalCluster
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig
from miles_stream.run_config import load_run_config
from miles_stream.status.snapshot import namespace_status
from miles_stream.testing.synthetic import synthetic_group

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _binary(tier: str) -> str:
    try:
        return tier_binary(tier)
    except TierMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module", params=["valkey", pytest.param("system", marks=pytest.mark.slow)])
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with LocalCluster(_binary(str(request.param))) as c:
        yield c


@pytest.fixture(params=["pinned", "redis-py"])
def client_kind(request: pytest.FixtureRequest) -> str:
    """The control client: pinned to the run's slot (what every process uses: RunConfig names the slot), or
    redis-py's cluster client (a RedisConfig built without a namespace)."""
    return str(request.param)


def cluster_config(url: str, ns: str, kind: str) -> RedisConfig:
    return RedisConfig(url=url, slot_of=ns if kind == "pinned" else "")


def tagged() -> str:
    return "{c" + uuid.uuid4().hex[:8] + "}"


def test_the_url_and_namespace_a_cluster_needs_are_checked_in_one_line() -> None:
    url = "redis://127.0.0.1:7000/?cluster=true"
    with pytest.raises(ConfigError, match=r"bus.namespace: .*share one slot.*\{run1\}"):
        load_run_config(None, [f"redis.url={url}", "bus.namespace=run1"])
    config = load_run_config(None, [f"redis.url={url}", "bus.namespace={run1}"])  # a hash tag, unquoted
    assert config.bus.namespace == "{run1}" and config.redis.cluster
    with pytest.raises(ConfigError, match=r"redis.url: \?cluster=maybe must be true or false"):
        RedisConfig(url="redis://127.0.0.1:7000/?cluster=maybe")
    seeds = parse_cluster_url("redis://u:p@a:7000/0?cluster=true&node=b:7001&node=c:7002&ssl_cert_reqs=none")
    assert seeds == ClusterUrl("redis://u:p@a:7000/0?ssl_cert_reqs=none", True, ("b:7001", "c:7002"))
    assert parse_cluster_url("redis://a:7000/0") == ClusterUrl("redis://a:7000/0", False)
    for bad in ("redis://a:7000/?node=b:7001", "redis://a:7000/?cluster=true&node=b"):
        with pytest.raises(ConfigError, match=r"node=.* must be host:port, beside \?cluster=true"):
            RedisConfig(url=bad)


async def test_a_url_must_say_whether_it_names_a_cluster(cluster: LocalCluster) -> None:
    plain = RedisConfig(url=cluster.url.replace("?cluster=true", ""), startup_wait_s=1)
    client = connect(plain)
    with pytest.raises(RedisUnavailableError, match=r"is a node of a Redis Cluster: add \?cluster=true"):
        await wait_until_reachable(client, plain)
    await client.aclose()
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as single:
        wrong = RedisConfig(url=f"{single.url}?cluster=true", startup_wait_s=1)
        client = connect(wrong)
        with pytest.raises(RedisUnavailableError, match="Cluster mode is not enabled"):
            await wait_until_reachable(client, wrong)
        await client.aclose()


async def test_groups_are_committed_once_under_the_fence_and_swept_on_a_cluster(
    cluster: LocalCluster, client_kind: str
) -> None:
    """Publish through the data plane, read and commit as the trainer does (fenced by its lease: WATCH/MULTI on
    the namespace's slot), read duplicates again and drop them, sweep the done set: all on the cluster."""
    ns = tagged()
    keys, config = Keys(ns), cluster_config(cluster.url, ns, client_kind)
    bus = BusConfig(namespace=ns, block_ms=100, claim_idle_ms=300, claim_interval_s=0.0)
    rng = np.random.default_rng(0)
    made = [synthetic_group(rng, n_samples=2, prompt_len=4, response_len=4, vocab=50, group_id=f"g{i}",
                            prompt_key=str(i)) for i in range(30)]  # fmt: skip
    await publish_groups(cluster.url, ns, made + made[:5])  # five published twice, as a retried XADD would
    admin, blocking = connect(config), open_stream_client(config, block_ms=100)
    assert isinstance(admin, redis.asyncio.Redis) == (client_kind == "pinned")  # not redis-py's RedisCluster
    try:
        await wait_until_reachable(admin, config)
        lease = Lease(admin, keys, "trainer", "t0", ttl_s=30)
        await lease.acquire()
        stream = StreamConsumer(admin, blocking, stream=keys.trajectories, group="trainer", consumer="t0",
                                dead_stream=keys.dead, config=bus)  # fmt: skip
        consumer = GroupConsumer(stream, keys, owns_prompts=True)
        consumer.fence = lease
        await consumer.start()
        got: list[str] = []
        for _ in range(200):
            items = await consumer.read(8)
            await consumer.commit(items)
            got += [r.group.group_id for r in items]
            if len(got) >= 30 and consumer.counters.duplicates >= 5:
                break
        assert sorted(got) == sorted(g.group_id for g in made) and consumer.counters.duplicates == 5
        await consumer.done.sweep()  # its two phases: the first marks, the second forgets what is settled
        await consumer.done.sweep()
    finally:
        await blocking.aclose()
        await admin.aclose()
    with redis.RedisCluster.from_url(cluster.url.split("?")[0]) as client:
        assert done_total(client, keys.done("trainer")) == 30
        assert client.xinfo_groups(keys.trajectories)[0]["pending"] == 0
        assert cluster.primary_of(keys.trajectories) == cluster.primary_of(keys.done("trainer"))


async def test_the_data_plane_and_the_control_client_follow_the_slot_when_it_moves(
    cluster: LocalCluster, client_kind: str
) -> None:
    """The slot of a namespace migrates to another primary while a client holds the old map: a key not yet moved
    is answered by the old node, a new key by the importing node (ASK), and after the move every command
    follows MOVED: the data plane itself, the control client through the retry policy every bus call has (the
    pinned client drops its connection and reconnects to the slot's new node)."""
    ns = tagged()
    keys, config = Keys(ns), cluster_config(cluster.url, ns, client_kind)
    retry = RetryPolicy()
    data, control = open_stream_client(config), connect(config)
    big = b"x" * (1 << 20)  # a large value: received into its own buffer by the data plane
    try:
        await data.set(f"{ns}:weights:v1:0", big)
        source = cluster.primary_of(keys.trajectories)
        target = (source + 1) % cluster.primaries
        cluster.begin_move(keys.trajectories, source, target)
        assert await data.get(f"{ns}:weights:v1:0") == big  # still on the source
        await data.xadd(keys.trajectories, {b"f": b"during"})  # a new key: ASK, then on the target
        cluster.finish_move(keys.trajectories, source, target)
        assert cluster.primary_of(keys.trajectories) == target
        assert await data.get(f"{ns}:weights:v1:0") == big  # MOVED: the map is read again
        await data.xadd(keys.trajectories, {b"f": b"after"})
        await retry.run(lambda: control.xgroup_create(keys.trajectories, "trainer", id="0"))
        read = await data.xreadgroup("trainer", "t", {keys.trajectories: ">"}, count=10)
        assert [f[b"f"] for _, f in read[0][1]] == [b"during", b"after"]
        assert await retry.run(lambda: control.get(f"{ns}:weights:v1:0")) == big
    finally:
        await data.aclose()
        await control.aclose()


async def test_an_acl_user_needs_the_cluster_commands_the_docs_name(cluster: LocalCluster, client_kind: str) -> None:
    """docs/redis.md's rules for a namespace-limited user, plus CLUSTER SLOTS (both clients read the slot map)
    and ASKING: set on every node (ACLs are per node); a data-plane round trip and a transaction work."""
    ns = tagged()
    password = uuid.uuid4().hex
    rules = ACL_RULES + CLUSTER_ACL_RULES
    for i in range(len(cluster.nodes)):
        with cluster.client(i) as node:
            node.execute_command("ACL", "SETUSER", f"u{ns[2:-1]}", "reset", f">{password}",
                                 *(r.format(ns=ns) for r in rules))  # fmt: skip
    url = cluster.url.replace("redis://", f"redis://u{ns[2:-1]}:{password}@")
    config = cluster_config(url, ns, client_kind)
    data, control = open_stream_client(config), connect(config)
    try:
        await wait_until_reachable(control, config)
        await data.xadd(f"{ns}:trajectories", {b"f": b"1"})
        async with control.pipeline(transaction=True) as pipe:
            await pipe.watch(f"{ns}:a")
            pipe.multi()
            pipe.set(f"{ns}:a", 1)
            assert await pipe.execute() == [True]
        with pytest.raises(redis.exceptions.NoPermissionError):
            await control.set("{other}:a", 1)
    finally:
        await data.aclose()
        await control.aclose()


async def test_status_and_reset_run_work_on_a_cluster(cluster: LocalCluster) -> None:
    """`status` reads the namespace's streams and the server's version; `reset-run` finds the namespace's keys on
    every primary (SCAN) and deletes them."""
    ns = tagged()
    config = load_run_config(None, [f"redis.url={cluster.url}", f"bus.namespace={ns}"])
    client = connect(config.redis)
    try:
        await client.xadd(f"{ns}:prompts", {b"d": b"x"})
        await client.hset(f"{ns}:feeder", mapping={"epoch": 0, "position": 1})
        status = await namespace_status(client, Keys(ns), 10.0)
        assert status.namespace == ns and status.server_version.startswith(("valkey", "redis"))
        assert (await admin.reset_namespace(config, yes=True))[1].startswith(f"namespace '{ns}': 2 keys deleted")
        assert not await client.exists(f"{ns}:prompts", f"{ns}:feeder")
    finally:
        await client.aclose()
