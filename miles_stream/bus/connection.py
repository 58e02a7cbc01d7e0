"""Redis connections and the retry policy.

redis-py pitfalls handled here:
- Its default `Retry` re-sends a command after a timeout, which can apply an XADD twice. Clients made here
  have redis-py's retries off; `RetryPolicy` retries explicitly, and consumers drop duplicate group ids.
- A blocking XREADGROUP needs a socket timeout longer than its BLOCK time, and its own connection so it
  never starves other commands: `connect(..., block_ms=...)` makes such a dedicated client.
- Connection pools are `BlockingConnectionPool`s: many coroutines wait for a connection instead of opening
  unbounded ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc
import structlog
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from miles_stream.bus.pinned import pinned_pool
from miles_stream.config import check
from miles_stream.errors import ConfigError, DataLossError, RedisUnavailableError

T = TypeVar("T")
log = structlog.get_logger(__name__)
ENV_URL = "MILES_REDIS_URL"
CLUSTER_PARAM = "cluster"  # redis://host:port/?cluster=true: the server is a node of a Redis Cluster
NODE_PARAM = "node"  # ...&node=host2:port&node=host3:port: more nodes to start from, if the first is down
_YES, _NO = ("true", "yes", "1"), ("false", "no", "0")


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    url: str  # without the two parameters above
    cluster: bool
    seeds: tuple[str, ...] = ()  # "host:port" of the other nodes named with `node=`


def parse_cluster_url(url: str) -> ClusterUrl:
    """Whether `url` names a Redis Cluster node, and which other nodes it names. Raises ConfigError for a
    `cluster` value other than true/false, or a `node` that is not host:port."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    values = [v.lower() for k, v in query if k == CLUSTER_PARAM]
    seeds = tuple(v for k, v in query if k == NODE_PARAM)
    if not values and not seeds:
        return ClusterUrl(url, False)
    if values and values[-1] not in _YES + _NO:
        raise ConfigError(f"redis.url: ?{CLUSTER_PARAM}={values[-1]} must be true or false")
    cluster = bool(values) and values[-1] in _YES
    for seed in seeds:
        host, _, port = seed.rpartition(":")
        if not cluster or not host or not port.isdigit():
            raise ConfigError(f"redis.url: {NODE_PARAM}={seed} must be host:port, beside ?{CLUSTER_PARAM}=true")
    rest = urlencode([(k, v) for k, v in query if k not in (CLUSTER_PARAM, NODE_PARAM)])
    return ClusterUrl(urlunsplit(parts._replace(query=rest)), cluster, seeds)


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    """Where the Redis server is. An empty url means: $MILES_REDIS_URL, else an embedded server. A url ending in
    `?cluster=true` names any node of a Redis Cluster, and `&node=host:port` (repeated) other nodes to start from
    (docs/redis.md, "A Redis Cluster")."""

    url: str = ""
    connect_timeout_s: float = 5.0
    socket_timeout_s: float = 30.0
    startup_wait_s: float = 15.0  # a process waits this long for its Redis to answer at start, then says so
    max_connections: int = 16
    health_check_interval_s: float = 15.0
    # On a Redis Cluster: the key (the run's namespace) whose slot every command goes to, so the control client
    # is pinned to the node serving it (bus/pinned.py). RunConfig sets it from bus.namespace; empty: redis-py's
    # cluster client.
    slot_of: str = ""

    def __post_init__(self) -> None:
        check(
            not self.url or self.url.startswith(("redis://", "rediss://", "unix://")),
            "redis.url",
            "must start with redis://, rediss:// or unix://",
        )
        check(self.connect_timeout_s > 0, "redis.connect_timeout_s", "must be positive")
        check(self.socket_timeout_s > 0, "redis.socket_timeout_s", "must be positive")
        check(self.startup_wait_s >= 0, "redis.startup_wait_s", "must be >= 0")
        check(self.max_connections >= 2, "redis.max_connections", "must be at least 2")
        parsed = parse_cluster_url(self.url)
        check(not parsed.cluster or not parsed.url.startswith("unix://"), "redis.url",
              "a Redis Cluster is reached over TCP")  # fmt: skip

    def resolved_url(self) -> str:
        """The url to use: this config's, else $MILES_REDIS_URL, else ''."""
        return self.url or os.environ.get(ENV_URL, "")

    @property
    def cluster(self) -> bool:
        """Whether the url (resolved) names a Redis Cluster node."""
        return parse_cluster_url(self.resolved_url()).cluster


def redact(url: str) -> str:
    """The url with its password replaced, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def connect(config: RedisConfig, url: str | None = None, *, block_ms: int | None = None) -> aioredis.Redis:
    """A client with redis-py's retries off. With `block_ms`, a one-connection client for blocking reads. For a
    `?cluster=true` url, a client pinned to the node that serves `config.slot_of` (bus/pinned.py), else (no slot
    given, or TLS) redis-py's cluster client (`connect_cluster`)."""
    url = url or config.resolved_url()
    if not url:
        raise RedisUnavailableError(f"no Redis url: set redis.url, --redis-url or ${ENV_URL}")
    parsed = parse_cluster_url(url)
    socket_timeout = config.socket_timeout_s
    max_connections = config.max_connections
    if block_ms is not None:
        socket_timeout = block_ms / 1000 + config.socket_timeout_s
        max_connections = 2
    pinned = parsed.cluster and bool(config.slot_of) and parsed.url.startswith("redis://")
    if parsed.cluster and not pinned:
        return connect_cluster(config, parsed, socket_timeout_s=socket_timeout, max_connections=max_connections)
    options: dict[str, Any] = dict(
        max_connections=max_connections,
        timeout=config.connect_timeout_s + socket_timeout,
        socket_connect_timeout=config.connect_timeout_s,
        socket_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=config.health_check_interval_s,
        retry=Retry(NoBackoff(), 0),
    )
    if pinned:  # the node serving the run's slot, found again after a failover
        pool = pinned_pool(parsed.url, parsed.seeds, config.slot_of, **options)
    else:
        pool = aioredis.BlockingConnectionPool.from_url(parsed.url, **options)
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes its connections


def connect_cluster(
    config: RedisConfig, url: ClusterUrl, *, socket_timeout_s: float, max_connections: int
) -> aioredis.Redis:
    """redis-py's cluster client, its retries off as `connect`'s: it follows MOVED and ASK itself, and after a
    connection error it reads the cluster's slots again before the next command (which our `RetryPolicy`
    sends). Typed as the single-server client: the bus calls only what both have (commands on keys of one
    slot, pipelines, WATCH/MULTI transactions within one slot)."""
    cluster = RedisCluster.from_url(
        url.url,
        startup_nodes=[ClusterNode(*seed.rsplit(":", 1)) for seed in url.seeds],
        # per node; not a blocking pool: a command over the bound raises MaxConnectionsError (a ConnectionError,
        # retried). Each coroutine holds a connection for one command, so twice the single-server bound is room.
        max_connections=2 * max_connections,
        socket_connect_timeout=config.connect_timeout_s,
        socket_timeout=socket_timeout_s,
        socket_keepalive=True,
        health_check_interval=config.health_check_interval_s,
        retry=Retry(NoBackoff(), 0),
    )
    return cast(aioredis.Redis, cluster)


async def wait_until_reachable(redis: aioredis.Redis, config: RedisConfig, stop: asyncio.Event | None = None) -> None:
    """PING until the server answers, for at most `config.startup_wait_s`: a process started just before its
    Redis waits for it, and a wrong url, port or password fails here in one line naming the server, instead of
    every later call being retried for ever. Raises `RedisUnavailableError`."""
    where = redact(config.resolved_url())
    deadline = time.monotonic() + config.startup_wait_s
    waiting = False
    while True:
        try:
            await redis.ping()
            await _check_cluster_mode(redis, config, where)
            return
        except RedisUnavailableError:
            raise
        except Exception as exc:
            if not is_transient(exc):  # a wrong password or a refused command: waiting will not help
                raise RedisUnavailableError(f"Redis at {where} refused this process: {exc}") from exc
            if time.monotonic() >= deadline:
                raise RedisUnavailableError(f"Redis at {where} does not answer ({exc}) after "
                                            f"{config.startup_wait_s:g} s: check --redis-url, $MILES_REDIS_URL or "
                                            f"redis.url, and that the server runs (redis.startup_wait_s waits "
                                            f"longer)") from exc  # fmt: skip
            if stop is not None and stop.is_set():
                raise RedisUnavailableError(f"stopped while waiting for Redis at {where} ({exc})") from exc
            if not waiting:
                log.warning("waiting_for_redis", url=where, error=str(exc), wait_s=config.startup_wait_s)
                waiting = True
            await asyncio.sleep(min(0.25, max(deadline - time.monotonic(), 0.0)))


async def _check_cluster_mode(redis: aioredis.Redis, config: RedisConfig, where: str) -> None:
    """A url without `?cluster=true` that names a cluster node would work until the first key of another node's
    slot, or the first failover: refuse it at start. (The other way round, redis-py's cluster client refuses a
    server without cluster mode itself.) Skipped where an ACL user may not run INFO."""
    if config.cluster:
        return
    try:
        info = await redis.info("cluster")
    except rexc.NoPermissionError:
        return
    if int(info.get("cluster_enabled", 0)):
        raise RedisUnavailableError(f"Redis at {where} is a node of a Redis Cluster: add ?{CLUSTER_PARAM}=true to "
                                    f"the url (docs/redis.md, 'A Redis Cluster')")  # fmt: skip


TRANSIENT: tuple[type[BaseException], ...] = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.OutOfMemoryError,  # redis-py 8 strips the "OOM" prefix from the message: matched by type, not text
    rexc.TryAgainError,
    rexc.ClusterDownError,  # CLUSTERDOWN: a cluster during a failover
    rexc.ClusterError,  # redis-py's cluster client gave up following redirections (a resharding, a failover)
    rexc.SlotNotCoveredError,  # its slot map has no node for the slot yet
    ConnectionError,
    asyncio.TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying: connection trouble, a loading server, or Redis out of memory. A wrong
    password (redis-py raises AuthenticationError / AuthorizationError, subclasses of its ConnectionError) is not:
    waiting would not fix it."""
    if isinstance(exc, rexc.AuthenticationError | rexc.AuthorizationError):
        return False
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(("OOM", "LOADING", "MASTERDOWN"))


async def read_watched(read: Awaitable[T]) -> T:
    """Await a read made after WATCH and before MULTI. redis-py reports a connection lost while watching as a
    WatchError; before the MULTI nothing was sent that could conflict, so it is the connection error it is, for
    the caller's retry (a cut connection stopped a trainer with a WatchError)."""
    try:
        return await read
    except rexc.WatchError as exc:
        raise rexc.ConnectionError(str(exc)) from exc


def lost_data(exc: BaseException) -> bool:
    """Whether `exc` says a consumer group or its stream is gone: Redis lost the run's data (or someone deleted it).

    A read blocked on a stream that is deleted meanwhile (FLUSHALL) is answered NOGROUP by Valkey 8 and Redis 6.2,
    and `UNBLOCKED the stream key no longer exists` by Redis 7.0 (t_stream.c, blocked-client unblock on deletion).
    """
    if not isinstance(exc, rexc.ResponseError):
        return False
    message = str(exc)
    return message.startswith("NOGROUP") or (message.startswith("UNBLOCKED") and "no longer exists" in message)


def data_loss_error(exc: BaseException) -> DataLossError:
    return DataLossError(f"Redis no longer has a consumer group of this run ({exc}): it restarted without "
                         f"persistence, was flushed, or the group was deleted. Stop every process of the run; to "
                         f"go on, decide it with `miles-stream reset-run` (docs/reliability.md)")  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff with full jitter. `attempts=0` retries forever (for long-lived loops)."""

    attempts: int = 5
    base_delay_s: float = 0.05
    max_delay_s: float = 5.0
    stop: asyncio.Event | None = field(default=None, compare=False)  # once set, keep retrying only stop_grace_s
    stop_grace_s: float = 3.0  # more: a process told to stop during an outage gives up instead of waiting on

    def __post_init__(self) -> None:
        check(self.attempts >= 0, "retry.attempts", "must be >= 0 (0 = forever)")
        check(0 < self.base_delay_s <= self.max_delay_s, "retry.base_delay_s", "must be in (0, max_delay_s]")

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.max_delay_s, self.base_delay_s * 2**attempt))

    async def run(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        on_retry: Callable[[int, BaseException], None] | None = None,
    ) -> T:
        """Call `fn` until it succeeds, retrying transient errors; the last one becomes RedisUnavailableError."""
        attempt = 0
        stopping_since = None
        while True:
            try:
                return await fn()
            except Exception as exc:
                if lost_data(exc):
                    raise data_loss_error(exc) from exc
                if not is_transient(exc):
                    raise
                attempt += 1
                if self.attempts and attempt >= self.attempts:
                    raise RedisUnavailableError(f"gave up after {attempt} attempts: {exc}") from exc
                delay = self.delay(attempt)
                if self.stop is not None and self.stop.is_set():
                    stopping_since = stopping_since or time.monotonic()
                    left = self.stop_grace_s - (time.monotonic() - stopping_since)
                    if left <= 0:
                        raise RedisUnavailableError(f"stopping, and Redis is still unavailable: {exc}") from exc
                    delay = min(delay, left)  # a backoff of up to max_delay_s outlasted the process's stop grace
                if on_retry is not None:
                    on_retry(attempt, exc)
                await self._sleep(delay)

    async def _sleep(self, delay: float) -> None:
        """The backoff, cut short when `stop` is set during it (the stop grace counts from then)."""
        if self.stop is None or self.stop.is_set():
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
