"""The data plane on a Redis Cluster: each command goes to the primary that serves its key's slot.

A run's keys share one slot (its namespace is a hash tag, `{run1}`: `keys.one_slot`), so in practice every
command goes to one node; the routing matters when that node fails over or the slot moves. The router reads the
slot map with CLUSTER SLOTS from any node it knows, follows MOVED (the slot has a new primary: read the map
again) and ASK (the slot is being migrated: ASKING, then the command, once, on that node's connection), and
after a connection error forgets the map, so the caller's retry reads it again and finds the promoted replica.
Redis Cluster spec: https://redis.io/docs/latest/operate/oss_and_stack/reference/cluster-spec/ (redirections).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.exceptions as rexc
from redis.crc import key_slot

MAX_REDIRECTS = 5


class Node(Protocol):
    """One connection to one server (`dataplane.RespConnection`)."""

    def command(self, *args: Any) -> Any: ...

    def close(self) -> None: ...


def node_url(seed_url: str, address: str) -> str:
    """`seed_url` (its credentials, its query) pointed at `address` ("host:port")."""
    parts = urlsplit(seed_url)
    user = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{user}{address}"))


def key_of(args: tuple[Any, ...]) -> bytes:
    """The key a data-plane command names: XADD/GET/SET key ..., XREADGROUP ... STREAMS key ... id."""
    name = str(args[0]).upper()
    if name == "XREADGROUP":
        at = next(i for i, a in enumerate(args) if isinstance(a, str) and a.upper() == "STREAMS")
        key = args[at + 1]
    else:
        key = args[1]
    return key.encode() if isinstance(key, str) else bytes(key)


class SlotRouter:
    """Sends each command to its slot's primary. Not thread-safe: it lives on the data-plane client's one worker
    thread, as a `RespConnection` does."""

    def __init__(self, seed_url: str, open_node: Callable[[str], Node], *, seeds: Sequence[str] = ()) -> None:
        self.seed_url = seed_url
        self._open = open_node
        self._nodes: dict[str, Node] = {}  # "host:port" -> its connection
        self._slots: list[tuple[int, int, str]] = []  # (first, last, primary "host:port"), from CLUSTER SLOTS
        self._moved: dict[int, str] = {}  # slot -> the primary a MOVED named, until the map is read again
        self._known: list[str] = []  # every node of the last map, replicas too: asked for the next map
        seed = urlsplit(seed_url)
        self._seeds = [f"{seed.hostname or '127.0.0.1'}:{seed.port or 6379}", *seeds]

    def command(self, *args: Any) -> Any:
        slot = key_slot(key_of(args))
        asking: str | None = None
        for _ in range(MAX_REDIRECTS):
            address = asking or self._primary(slot)
            node = self._node(address)
            try:
                if asking is not None:
                    node.command("ASKING")
                return node.command(*args)
            except rexc.ResponseError as exc:
                kind, _, where = _redirect(str(exc))
                if kind == "MOVED":
                    self._slots = []
                    self._moved[slot] = where
                    asking = None
                elif kind == "ASK":
                    asking = where
                else:
                    raise
            except (rexc.ConnectionError, rexc.TimeoutError):
                self._forget(address)
                raise
        raise rexc.ClusterError(f"slot {slot}: still redirected after {MAX_REDIRECTS} tries")

    def close(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for node in nodes.values():
            node.close()

    def _node(self, address: str) -> Node:
        node = self._nodes.get(address)
        if node is None:
            node = self._nodes[address] = self._open(node_url(self.seed_url, address))
        return node

    def _forget(self, address: str) -> None:
        """After a connection error: the node may be gone (a failover), so the map is read again next time."""
        node = self._nodes.pop(address, None)
        if node is not None:
            node.close()
        self._slots, self._moved = [], {}

    def _primary(self, slot: int) -> str:
        if slot in self._moved:
            return self._moved[slot]
        if not self._slots:
            self._read_map()
        for first, last, address in self._slots:
            if first <= slot <= last:
                return address
        raise rexc.ClusterDownError(f"CLUSTERDOWN no node serves slot {slot} yet")

    def _read_map(self) -> None:
        errors = []
        # the seed and the primaries may be the nodes that died (a failover): the replicas named last time answer
        for address in dict.fromkeys([*self._nodes, *self._known, *self._seeds]):
            try:
                reply = self._node(address).command("CLUSTER", "SLOTS")
            except (rexc.ConnectionError, rexc.TimeoutError) as exc:
                self._nodes.pop(address, None)
                errors.append(f"{address}: {exc}")
                continue
            host = address.rsplit(":", 1)[0]
            self._slots = [(int(r[0]), int(r[1]), node_address(r[2], host)) for r in reply]
            self._known = list(dict.fromkeys(node_address(n, host) for r in reply for n in r[2:]))
            self._moved = {}
            return
        raise rexc.ConnectionError(f"no cluster node answered CLUSTER SLOTS ({'; '.join(errors)})")


def _redirect(message: str) -> tuple[str, str, str]:
    """("MOVED" or "ASK", slot, "host:port") from a redirection error; ("", "", "") for any other error."""
    words = message.split()
    if len(words) == 3 and words[0] in ("MOVED", "ASK"):
        return words[0], words[1], words[2]
    return "", "", ""


def node_address(entry: list[Any], default_host: str) -> str:
    """ "host:port" of a CLUSTER SLOTS node entry [ip, port, id, ...]; an empty ip means the node we asked."""
    ip = entry[0].decode() if isinstance(entry[0], bytes | bytearray) else str(entry[0])
    return f"{ip or default_host}:{int(entry[1])}"
