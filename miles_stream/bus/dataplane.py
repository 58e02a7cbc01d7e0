"""The data-plane client: XADD and XREADGROUP of multi-megabyte entries (and GET/SET of weight chunks) at the
speed Redis can serve them.

Why not redis-py for these two commands: a 13.6 MB entry took up to 30 ms to XADD and up to 26 ms to read through
redis-py (async or sync), against 5-8 ms with this client (docs/benchmarks.md, bench/bench_clients.py). Redis
writes a large reply 64 KB per event-loop turn, so an asyncio reader pays an event-loop wake-up per 64 KB; a
blocking socket is woken by the kernel directly. So this client speaks RESP2 on a blocking socket, on one worker
thread per connection: a command goes out in one `sendmsg` (no copy of the payload), and a large bulk reply is
received straight into its final buffer. Replies mirror redis-py's shapes, and failures raise redis-py's
exception types, so callers and `is_transient` treat both clients alike.

`rediss://` (TLS) uses redis-py instead; see `open_stream_client`. On a Redis Cluster (`?cluster=true`) a
`slots.SlotRouter` sends each command to its slot's primary over one such connection per node.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis.exceptions as rexc

from miles_stream.bus.connection import RedisConfig, connect, parse_cluster_url
from miles_stream.bus.slots import Node, SlotRouter
from miles_stream.codec import Frame

_CHUNK = 1 << 16
_BIG = 1 << 16  # bulk strings at least this large are received into their own buffer
Fields = dict[Any, Any]


class StreamClient(Protocol):
    """What the bus needs for bulk data: both this module's client and redis-py's async client fit."""

    async def xadd(self, name: str, fields: Fields, *, maxlen: int | None = None, approximate: bool = True) -> Any: ...

    async def xreadgroup(
        self,
        groupname: str,
        consumername: str,
        streams: dict[str, str],
        count: int | None = None,
        block: int | None = None,
    ) -> Any: ...

    async def get(self, name: str) -> Any: ...

    async def set(self, name: str, value: Any) -> Any: ...

    async def aclose(self) -> None: ...


def open_stream_client(config: RedisConfig, url: str | None = None, *, block_ms: int | None = None) -> StreamClient:
    """The fast client for redis:// and unix:// urls (routed by slot on a cluster); redis-py's async client for
    rediss:// (TLS)."""
    url = url or config.resolved_url()
    if url.startswith("rediss://"):
        return cast(StreamClient, connect(config, url, block_ms=block_ms))  # redis-py's typing is looser
    timeout = config.socket_timeout_s + (block_ms or 0) / 1000
    parsed = parse_cluster_url(url)

    def open_node(node_url: str) -> RespConnection:
        return RespConnection(node_url, connect_timeout_s=config.connect_timeout_s, timeout_s=timeout)

    if parsed.cluster:
        return ThreadedStreamClient(SlotRouter(parsed.url, open_node, seeds=parsed.seeds))
    return ThreadedStreamClient(open_node(parsed.url))


class RespConnection:
    """One blocking RESP2 connection. Not thread-safe: `ThreadedStreamClient` gives it one thread."""

    def __init__(self, url: str, *, connect_timeout_s: float, timeout_s: float) -> None:
        self.url, self.connect_timeout_s, self.timeout_s = url, connect_timeout_s, timeout_s
        self._sock: socket.socket | None = None
        self._buf = bytearray(_CHUNK)
        self._start = self._end = 0

    def command(self, *args: Any) -> Any:
        sock = self._sock or self._connect()
        try:
            _send_all(sock, _pack(args))
            return self._read_reply(sock)
        except TimeoutError as exc:
            self.close()
            raise rexc.TimeoutError(f"no reply from Redis within {self.timeout_s}s") from exc
        except OSError as exc:
            self.close()
            raise rexc.ConnectionError(f"connection to Redis lost: {exc}") from exc

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._start = self._end = 0
        if sock is not None:
            sock.close()

    def _connect(self) -> socket.socket:
        parts = urlsplit(self.url)
        try:
            if parts.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout_s)
                sock.connect(parts.path)
            else:
                address = (parts.hostname or "127.0.0.1", parts.port or 6379)
                sock = socket.create_connection(address, timeout=self.connect_timeout_s)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise rexc.ConnectionError(f"cannot connect to Redis: {exc}") from exc
        sock.settimeout(self.timeout_s)
        self._sock = sock
        self._start = self._end = 0
        db = parts.path.lstrip("/") if parts.scheme != "unix" else parse_qs(parts.query).get("db", ["0"])[0]
        try:
            if parts.password is not None:
                user = (unquote(parts.username),) if parts.username else ()
                self.command("AUTH", *user, unquote(parts.password))
            if db and db != "0":
                self.command("SELECT", db)
        except rexc.RedisError:
            self.close()  # never leave an unauthenticated socket for the next command
            raise
        return sock

    # ---- reading -----------------------------------------------------------------------------------------
    def _fill(self, sock: socket.socket) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):  # compact; grow only for a header line longer than the buffer
            live = self._end - self._start
            if self._start == 0:
                self._buf.extend(bytes(len(self._buf)))
            else:
                self._buf[:live] = self._buf[self._start : self._end]
                self._start, self._end = 0, live
        n = sock.recv_into(memoryview(self._buf)[self._end :])
        if n == 0:
            raise ConnectionResetError("Redis closed the connection")
        self._end += n

    def _line(self, sock: socket.socket) -> bytes:
        while True:
            i = self._buf.find(b"\r\n", self._start, self._end)
            if i >= 0:
                line = bytes(self._buf[self._start : i])
                self._start = i + 2
                return line
            self._fill(sock)

    def _exact(self, sock: socket.socket, n: int) -> bytes | bytearray:
        """n bytes plus the trailing CRLF; large values land in their own buffer, received in place."""
        have = self._end - self._start
        if n + 2 <= have:
            out = bytes(self._buf[self._start : self._start + n])
            self._start += n + 2
            return out
        if n < _BIG:
            while self._end - self._start < n + 2:
                self._fill(sock)
            return self._exact(sock, n)
        value = bytearray(n + 2)
        view = memoryview(value)
        view[:have] = self._buf[self._start : self._end]
        self._start = self._end = 0
        got = have
        while got < n + 2:
            k = sock.recv_into(view[got:], n + 2 - got, socket.MSG_WAITALL)
            if k == 0:
                raise ConnectionResetError("Redis closed the connection")
            got += k
        del view
        del value[n:]  # the CRLF
        return value

    def _read_reply(self, sock: socket.socket) -> Any:
        line = self._line(sock)
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(sock, n)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read_reply(sock) for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            raise _error(rest.decode(errors="replace"))
        raise rexc.InvalidResponse(f"unexpected RESP line {line[:40]!r}")


class ThreadedStreamClient:
    """Async facade over a `RespConnection`: each command runs on the connection's own worker thread.
    Field values may be `codec.Frame`s, sent without joining them first."""

    def __init__(self, conn: Node) -> None:
        self.conn = conn
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miles-dataplane")

    async def _run(self, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.conn.command, *args)

    async def xadd(self, name: str, fields: Fields, *, maxlen: int | None = None, approximate: bool = True) -> Any:
        cap: tuple[Any, ...] = ("MAXLEN", "~" if approximate else "=", maxlen) if maxlen is not None else ()
        flat = [x for kv in fields.items() for x in kv]
        return await self._run("XADD", name, *cap, "*", *flat)

    async def xreadgroup(
        self,
        groupname: str,
        consumername: str,
        streams: dict[str, str],
        count: int | None = None,
        block: int | None = None,
    ) -> Any:
        args: list[Any] = ["XREADGROUP", "GROUP", groupname, consumername]
        if count is not None:
            args += ["COUNT", count]
        if block is not None:
            args += ["BLOCK", block]
        args += ["STREAMS", *streams.keys(), *streams.values()]
        reply = await self._run(*args)
        if reply is None:
            return []
        return [[name, [(i, _pairs(f)) for i, f in entries]] for name, entries in reply]

    async def get(self, name: str) -> Any:
        """A bulk string (a weight chunk): received into its own buffer on the worker thread."""
        return await self._run("GET", name)

    async def set(self, name: str, value: Any) -> Any:
        return await self._run("SET", name, value)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.conn.close)
        self._pool.shutdown(wait=False)


def _pairs(flat: list[Any] | None) -> dict[bytes, Any]:
    if flat is None:  # an entry deleted while pending, re-read from the history
        return {}
    return {bytes(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


def _send_all(sock: socket.socket, parts: list[Any]) -> None:
    """`sendmsg` until every buffer is out (it may send part of them)."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def _pack(args: tuple[Any, ...]) -> list[Any]:
    """RESP request as a list of buffers for `sendmsg`: large arguments are sent from where they are."""
    parts: list[Any] = []
    head = bytearray(b"*%d\r\n" % len(args))
    for arg in args:
        if isinstance(arg, Frame):  # one bulk string sent from its parts
            head += b"$%d\r\n" % arg.nbytes
            parts += [bytes(head), *arg.parts]
            head = bytearray(b"\r\n")
            continue
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int | float):
            arg = repr(arg).encode()
        size = memoryview(arg).nbytes
        head += b"$%d\r\n" % size
        if size < _BIG:
            head += arg
            head += b"\r\n"
        else:
            parts += [bytes(head), arg]
            head = bytearray(b"\r\n")
    parts.append(bytes(head))
    return parts


def _error(message: str) -> rexc.RedisError:
    code = message.split(" ", 1)[0]
    if code == "NOGROUP":
        return rexc.ResponseError(message)
    if code == "LOADING":
        return rexc.BusyLoadingError(message)
    if code in ("NOAUTH", "WRONGPASS"):
        return rexc.AuthenticationError(message)
    if code == "NOPERM":
        return rexc.NoPermissionError(message)
    if code == "CLUSTERDOWN":  # a cluster mid-failover: transient, as in redis-py
        return rexc.ClusterDownError(message)
    if code == "TRYAGAIN":  # a multi-key command on a slot being migrated
        return rexc.TryAgainError(message)
    return rexc.ResponseError(message)
