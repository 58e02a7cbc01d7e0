"""The control client on a Redis Cluster, pinned to the run's slot.

A run's keys share one slot (its namespace is a hash tag), so every command a process sends goes to one node: the
primary that serves that slot. This client is redis-py's single-server client whose connections find that
primary when they connect (CLUSTER SLOTS, asked of any node known, replicas included), so transactions,
pipelines and blocking reads run as on one server, at its speed. After a failover the connections break
(a ConnectionError, which the caller's retry policy retries) and the next ones find the promoted replica. A
reply of MOVED or ASK (the slot moved, or is moving to another primary) drops the connection and is raised as
a ConnectionError too: the retry reconnects to whoever serves the slot then.

Why not redis-py's `RedisCluster` for this: its asyncio transactions (WATCH/MULTI) resolve each queued command's
slot on a new thread with its own event loop and join it, blocking the caller's loop meanwhile
(`redis/asyncio/cluster.py`, `_run_coroutine_in_thread`, redis-py 8.2): measured here at 17-56 ms a transaction
on a busy 2-core VM against 0.33 ms on one server. `connect` uses `RedisCluster` only where the slot is not
known (a `RedisConfig` built without a namespace: tools, tests).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.crc import key_slot

from miles_stream.bus.slots import node_address


class KnownNodes:
    """The nodes a pool's connections may ask for the slot map ("host:port"), learned from each map read."""

    def __init__(self, seeds: list[str]) -> None:
        self.addresses = list(dict.fromkeys(seeds))

    def learn(self, slots: list[Any], asked: str) -> None:
        host = asked.rsplit(":", 1)[0]
        found = [node_address(node, host) for entry in slots for node in entry[2:]]
        self.addresses = list(dict.fromkeys([*found, *self.addresses]))


class SlotConnection(aioredis.Connection):
    """A connection to the primary that serves `slot` when it connects."""

    def __init__(self, *, slot: int, nodes: KnownNodes, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.slot, self.nodes = slot, nodes

    async def _connect(self) -> None:
        self.host, self.port = await self._primary()
        await super()._connect()  # type: ignore[no-untyped-call]

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except rexc.AskError as exc:  # MovedError is one too
            await self.disconnect()
            raise rexc.ConnectionError(f"the run's slot answered {exc}: reconnecting to its node") from exc

    async def _primary(self) -> tuple[str, int]:
        errors = []
        for address in list(self.nodes.addresses):
            host, port = address.rsplit(":", 1)
            probe = aioredis.Connection(host=host, port=int(port), username=self.username, password=self.password,
                                        socket_connect_timeout=self.socket_connect_timeout,
                                        socket_timeout=self.socket_timeout, retry=self.retry)  # fmt: skip
            try:
                await probe.connect()  # type: ignore[no-untyped-call]
                await probe.send_command("CLUSTER", "SLOTS")
                slots = await probe.read_response()
            except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                errors.append(f"{address}: {exc}")
                continue
            finally:
                await probe.disconnect()
            self.nodes.learn(slots, address)
            for first, last, primary, *_ in slots:
                if int(first) <= self.slot <= int(last):
                    at = node_address(primary, host).rsplit(":", 1)
                    return at[0], int(at[1])
            raise rexc.ClusterDownError(f"CLUSTERDOWN no node serves slot {self.slot} yet")
        raise rexc.ConnectionError(f"no cluster node answered CLUSTER SLOTS ({'; '.join(errors)})")


def pinned_pool(url: str, seeds: tuple[str, ...], slot_of: str, **kwargs: Any) -> aioredis.BlockingConnectionPool:
    """A pool of connections to the primary serving `slot_of`'s slot, starting from the node `url` names and
    `seeds`; `kwargs` as for `BlockingConnectionPool.from_url`."""
    pool = aioredis.BlockingConnectionPool.from_url(url, **kwargs)
    first = f"{pool.connection_kwargs.get('host', '127.0.0.1')}:{pool.connection_kwargs.get('port', 6379)}"
    pool.connection_class = SlotConnection
    pool.connection_kwargs.update(slot=key_slot(slot_of.encode()), nodes=KnownNodes([first, *seeds]))
    return pool
