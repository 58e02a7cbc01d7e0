"""Whole processes on a Redis Cluster (tests/redis_cluster.py, Valkey 8 on loopback):

    a primary fails over     the node serving the run's slot is killed (-9) while a producer publishes; its
                             replica takes the slot over; the producer and a committing consumer find it (the url
                             names the dead node first) and every prompt is committed exactly once: what the
                             replica had not received (replication is asynchronous) is a prompt still pending,
                             generated again, or a second copy, dropped by group id, as after a host crash
    a producer's kill -9     its prompts move to another producer (slow tier: the same test as on one server)
    an ACL user              a namespace-limited user runs feed, produce, train, status (slow tier)
    partitions               the same with bus.partitions=3, each partition on a primary of its own, the user
                             limited to the run's and its partitions' keys (slow tier); and a partitioned run
                             whose producer is killed (-9) and whose partition-0 primary then fails over: every
                             prompt committed exactly once, in its partition (slow tier)

The pipeline test itself runs on a cluster with -m slow (tests/integration/test_pipeline.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from redis_acl import ACL_RULES, CLUSTER_ACL_RULES, feed_produce_train_status
from redis_groups import done_total
from redis_tiers import tier_binary
from test_process_faults import PROMPTS, commit_all, feed, pending, producer, wait_for
from test_redis_faults import consume

from miles_stream.bus import BusConfig, GroupConsumer, RedisConfig, StreamConsumer, connect
from miles_stream.bus.connection import RetryPolicy
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.bus.keys import key_patterns, partition_keys
from miles_stream.bus.partitioned import PartitionedConsumer, close_partition_clients, partition_clients
from miles_stream.demo.task import write_task
from miles_stream.redis_cluster import LocalCluster

CLI = [sys.executable, "-m", "miles_stream.cli"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def namespace_on(cluster: LocalCluster, node: int) -> str:
    """A hash-tag namespace whose slot `node` serves."""
    while True:
        ns = "{c" + uuid.uuid4().hex[:8] + "}"
        if cluster.primary_of(f"{ns}:prompts") == node:
            return ns


def account(client: redis.RedisCluster, ns: str, keys: list[str]) -> None:
    assert sorted(keys, key=int) == [str(i) for i in range(PROMPTS)]  # each prompt committed exactly once
    assert done_total(client, f"{ns}:done:trainer") == PROMPTS
    assert pending(client, f"{ns}:prompts", "producers") == 0  # type: ignore[arg-type]
    assert not client.exists(f"{ns}:dead")


def test_the_pipeline_rides_out_a_primary_failover(tmp_path: Path) -> None:
    with LocalCluster(tier_binary("valkey"), replicas=1) as cluster:
        ns = namespace_on(cluster, 0)  # the node the url names first: the worst case
        url = cluster.url_with_every_node  # a process started after the failover still finds the cluster
        model_dir, prompts = write_task(tmp_path)
        env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
        feed(ns, prompts, env)
        with cluster.client(0) as primary:
            assert primary.execute_command("WAIT", 1, 5000) == 1  # the prompts reached the replica
        client = redis.RedisCluster.from_url(cluster.url.split("?")[0])
        first = producer(ns, "p", model_dir, env, tmp_path / "producer.log")
        try:
            wait_for(lambda: client.xlen(f"{ns}:trajectories") >= 20, 120, "20 groups published")
            cluster.nodes[0].kill()  # mid-run: the producer is generating and publishing
            client.close()
            keys, _ = asyncio.run(consume(url, ns, stop_after=3.0))
        finally:
            first.send_signal(signal.SIGTERM)
            code = first.wait(timeout=60)
        log = (tmp_path / "producer.log").read_text()
        assert code == 0, log[-3000:]
        new_primary = cluster.primary_of(f"{ns}:prompts", via=1)
        assert new_primary >= cluster.primaries  # a replica took the slot over
        with redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[1].port) as client:
            account(client, ns, keys)


@pytest.mark.slow
def test_a_producer_killed_on_a_cluster_leaves_its_prompts_to_another(tmp_path: Path) -> None:
    with LocalCluster(tier_binary("valkey")) as cluster:
        ns = namespace_on(cluster, 1)
        model_dir, prompts = write_task(tmp_path)
        env = {**os.environ, "MILES_REDIS_URL": cluster.url, "HF_HUB_OFFLINE": "1"}
        feed(ns, prompts, env)
        with redis.RedisCluster.from_url(cluster.url.split("?")[0]) as client:
            first = producer(ns, "first", model_dir, env, tmp_path / "first.log")
            wait_for(lambda: pending(client, f"{ns}:prompts", "producers") >= 2, 120, "the first producer's claims")  # type: ignore[arg-type]
            first.send_signal(signal.SIGKILL)
            second = producer(ns, "second", model_dir, env, tmp_path / "second.log")
            try:
                keys, _ = asyncio.run(commit_all(cluster.url, ns, PROMPTS))
            finally:
                second.send_signal(signal.SIGTERM)
                assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()[-3000:]
                first.wait()
            account(client, ns, keys)
            assert pending(client, f"{ns}:trajectories", "trainer") == 0  # type: ignore[arg-type]
        assert "entries_reclaimed" in (tmp_path / "second.log").read_text()


@pytest.mark.slow
def test_a_namespace_limited_acl_user_runs_the_pipeline_on_a_cluster(tmp_path: Path) -> None:
    with LocalCluster(tier_binary("valkey")) as cluster:
        ns = namespace_on(cluster, 2)
        password = uuid.uuid4().hex
        for i in range(len(cluster.nodes)):  # ACLs are per node
            with cluster.client(i) as node:
                node.execute_command("ACL", "SETUSER", "miles", f">{password}",
                                     *(r.format(ns=ns) for r in ACL_RULES + CLUSTER_ACL_RULES))  # fmt: skip
        url = cluster.url.replace("redis://", f"redis://miles:{password}@")
        feed_produce_train_status(url, ns, tmp_path)
        with redis.RedisCluster.from_url(url.split("?")[0]) as user:
            announced = [int(f[b"version"]) for _, f in user.xrange(f"{ns}:weights")]
            assert announced[-1] == 3 and announced == sorted(set(announced))
            with pytest.raises(redis.exceptions.NoPermissionError):
                user.set("{other}:x", 1)


@pytest.mark.slow
def test_a_partitioned_run_as_processes_on_a_cluster_as_a_namespace_limited_user(tmp_path: Path) -> None:
    """feed, produce, train and status with bus.partitions=3 (each partition's primary its own), run by a user
    allowed only the run's keys and its partitions' (docs/redis.md): every group trained once, in its partition."""
    with LocalCluster(tier_binary("valkey")) as cluster:
        while True:
            ns = namespace_on(cluster, 0)
            parts = partition_keys(ns, 3)
            if sorted(cluster.primary_of(k.trajectories) for k in parts) == [0, 1, 2]:
                break
        password = uuid.uuid4().hex
        partition_rules = key_patterns(ns, 3)[1:]  # ~{cXXXX.p0}:* ~{cXXXX.p1}:* ~{cXXXX.p2}:*
        for i in range(len(cluster.nodes)):
            with cluster.client(i) as node:
                rules = [*(r.format(ns=ns) for r in ACL_RULES + CLUSTER_ACL_RULES), *partition_rules]  # after resetkeys
                node.execute_command("ACL", "SETUSER", "miles", f">{password}", *rules)
        url = cluster.url.replace("redis://", f"redis://miles:{password}@")
        feed_produce_train_status(url, ns, tmp_path, ["bus.partitions=3"])
        with redis.RedisCluster.from_url(cluster.url.split("?")[0]) as client:
            done = [done_total(client, k.done("trainer")) for k in parts]
            assert sum(done) >= 12 and all(done), done  # 3 steps of 4 groups at least, read from every partition
            fed = [sum(int(v) for v in client.hvals(f"{k.namespace}:feeder:published")) for k in parts]
            assert fed == [34, 33, 33]  # the demo task's 100 prompts, position i to partition i mod 3
            assert not client.exists(f"{ns}:prompts", f"{ns}:trajectories", f"{ns}:done:trainer")
            assert client.exists(f"{ns}:weights")  # the run's own keys stay in its slot


async def consume_partitions(url: str, ns: str, partitions: int, stop_after: float) -> list[str]:
    """`consume` over every partition, as the trainer's PartitionedConsumer reads and commits them (one
    transaction per partition, each in its own slot), riding out the failover."""
    config = RedisConfig(url=url, connect_timeout_s=0.5)
    control, blocking = connect(config), open_stream_client(config, block_ms=200)
    parts = partition_keys(ns, partitions)
    clients = partition_clients(config, parts, control)
    bus = BusConfig(namespace=ns, block_ms=200, partitions=partitions)
    retry = RetryPolicy(attempts=0, max_delay_s=0.2)
    groups = [GroupConsumer(StreamConsumer(c, blocking, stream=k.trajectories, group="trainer", consumer="t",
                                           dead_stream=k.dead, config=bus), k, retry=retry, partition=p)
              for p, (c, k) in enumerate(zip(clients, parts, strict=True))]  # fmt: skip
    consumer = PartitionedConsumer(groups, range(partitions))
    await retry.run(consumer.start)
    got: list[str] = []
    last = started = time.monotonic()
    try:
        while time.monotonic() - started < 180 and (len(set(got)) < PROMPTS or time.monotonic() - last < stop_after):
            items = await retry.run(lambda: consumer.read(32))
            if items:
                await retry.run(lambda batch=items: consumer.commit(batch))  # type: ignore[misc]
                got += [r.group.prompt_key for r in items]
                last = time.monotonic()
    finally:
        await close_partition_clients(clients, control)
        await blocking.aclose()
        await control.aclose()
    return got


@pytest.mark.slow
def test_a_partitioned_run_rides_out_a_producers_kill_and_a_partitions_failover(tmp_path: Path) -> None:
    with LocalCluster(tier_binary("valkey"), replicas=1) as cluster:
        while True:  # each partition on a primary of its own; the run's own slot anywhere
            ns = namespace_on(cluster, 1)
            parts = partition_keys(ns, 3)
            if sorted(cluster.primary_of(k.trajectories) for k in parts) == [0, 1, 2]:
                break
        lost = next(p for p, k in enumerate(parts) if cluster.primary_of(k.trajectories) == 0)
        url, extra = cluster.url_with_every_node, ["bus.partitions=3"]
        model_dir, prompts = write_task(tmp_path)
        env = {**os.environ, "MILES_REDIS_URL": url, "HF_HUB_OFFLINE": "1"}
        feed(ns, prompts, env, extra)
        for i in range(cluster.primaries):
            with cluster.client(i) as primary:
                assert primary.execute_command("WAIT", 1, 5000) == 1  # the prompts reached the replicas
        client = redis.RedisCluster.from_url(cluster.url.split("?")[0])
        first = producer(ns, "first", model_dir, env, tmp_path / "first.log", extra)
        claimed = lambda: sum(pending(client, k.prompts, "producers") for k in parts)  # type: ignore[arg-type]  # noqa: E731
        wait_for(lambda: claimed() >= 2, 120, "the first producer's claims")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = producer(ns, "second", model_dir, env, tmp_path / "second.log", extra)
        try:
            wait_for(lambda: sum(client.xlen(k.trajectories) for k in parts) >= 20, 120, "20 groups published")
            cluster.nodes[0].kill()  # partition `lost`'s primary, mid-run
            client.close()
            keys = asyncio.run(consume_partitions(url, ns, 3, stop_after=3.0))
        finally:
            second.send_signal(signal.SIGTERM)
            code = second.wait(timeout=60)
        log = (tmp_path / "second.log").read_text()
        assert code == 0, log[-3000:]
        assert cluster.primary_of(parts[lost].trajectories, via=1) >= cluster.primaries  # a replica took it over
        with redis.RedisCluster(host="127.0.0.1", port=cluster.nodes[1].port) as after:
            assert sorted(keys, key=int) == [str(i) for i in range(PROMPTS)]  # each prompt committed exactly once
            assert sum(done_total(after, k.done("trainer")) for k in parts) == PROMPTS
            assert all(pending(after, k.prompts, "producers") == 0 for k in parts)  # type: ignore[arg-type]
            assert not any(after.exists(k.dead) for k in parts)
            fed = [sum(int(v) for v in after.hvals(f"{k.namespace}:feeder:published")) for k in parts]
            assert fed == [34, 33, 33]  # position i to partition i mod 3, each fed once
        assert "entries_reclaimed" in log  # the killed producer's prompts, taken over
