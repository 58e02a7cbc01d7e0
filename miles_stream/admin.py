"""What the CLI does to a namespace without starting a process of the run: check a server, replay a recording
into it, show its status, reset it after a data loss, edit a producer's SGLang servers. Each takes the run
config and returns what the command prints; the CLI only parses and dispatches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from miles_stream.bus import Backpressure, Keys, alive_members, connect, open_stream_client, redact
from miles_stream.bus.keys import partition_keys
from miles_stream.bus.partitioned import close_partition_clients, partition_clients
from miles_stream.bus.run import check_partitions, reset_run, run_partitions
from miles_stream.errors import ConfigError, MilesStreamError
from miles_stream.record.recorder import replay
from miles_stream.run_config import RunConfig
from miles_stream.status import namespace_status, render_json, render_tables, watch


async def ping(config: RunConfig, url: str) -> None:
    client = connect(config.redis, url)
    try:
        await client.ping()
    except Exception as exc:
        raise MilesStreamError(f"Redis at {redact(url)} does not answer: {exc}") from exc
    finally:
        await client.aclose()


async def replay_files(config: RunConfig, files: Sequence[str], rate: float) -> str:
    """Publish a recording into the namespace's trajectory stream, or with partitions into each group's (its
    group id's hash), each partition's backlog bounded by its share as a producer's is."""
    keys, n = Keys(config.bus.namespace), config.bus.partitions
    redis, data = connect(config.redis), open_stream_client(config.redis)
    parts = partition_keys(keys.namespace, n)
    clients = partition_clients(config.redis, parts, redis)
    bounds = replace(config.bus, max_backlog_entries=-(-config.bus.max_backlog_entries // n),
                     max_backlog_bytes=-(-config.bus.max_backlog_bytes // n))  # fmt: skip
    lanes = [(k.trajectories, Backpressure(c, k.trajectories, bounds)) for c, k in zip(clients, parts, strict=True)]
    try:
        await check_partitions(redis, keys, n)
        published, skipped = await replay(files, data, lanes, maxlen=config.bus.maxlen_cap, rate=rate)
    except FileNotFoundError as exc:
        raise MilesStreamError(str(exc)) from exc
    finally:
        await close_partition_clients(clients, redis)
        await data.aclose()
        await redis.aclose()
    into = keys.trajectories if n == 1 else f"the {n} partitions' trajectory streams"
    return f"replayed {published} groups into {into} ({skipped} invalid records skipped)"


async def show_status(config: RunConfig, namespace: str, *, as_json: bool, follow: bool, interval_s: float) -> None:
    keys = Keys(namespace or config.bus.namespace)
    client = connect(config.redis)
    clients: list[Any] = []
    try:
        fed = await run_partitions(client, keys)  # the run's own count, where it was fed, whatever the config says
        parts = partition_keys(keys.namespace, fed or config.bus.partitions)
        clients = partition_clients(config.redis, parts, client)
        partitions = list(zip(clients, parts, strict=True)) if len(parts) > 1 else []
        if follow:
            await watch(client, keys, config.bus.heartbeat_ttl_s, interval_s, as_json=as_json, partitions=partitions)
            return
        status = await namespace_status(client, keys, config.bus.heartbeat_ttl_s, partitions)
    except MilesStreamError:
        raise
    except Exception as exc:
        raise MilesStreamError(f"cannot read Redis at {redact(config.redis.resolved_url())}: {exc}") from exc
    finally:
        await close_partition_clients(clients, client)
        await client.aclose()
    if as_json:
        print(render_json(status), end="")
    else:
        render_tables(status)


async def reset_namespace(config: RunConfig, *, yes: bool) -> tuple[int, str]:
    """Delete what is left of the namespace's keys, every partition's too (those of the count the run was fed with
    and of the configured one), and start a new run: (exit code, what to print)."""
    keys = Keys(config.bus.namespace)
    client = connect(config.redis)
    clients: list[Any] = []
    try:
        counts = {config.bus.partitions, await run_partitions(client, keys) or 1}
        parts = list({k.namespace: k for n in sorted(counts) for k in partition_keys(keys.namespace, n) if k != keys}
                     .values())  # fmt: skip
        clients = partition_clients(config.redis, parts, client) if parts else []
        spaces = [(client, keys), *zip(clients, parts, strict=True)]
        found = [(c, [key async for key in c.scan_iter(match=f"{k.namespace}:*", count=1000)]) for c, k in spaces]
        total = sum(len(keys_found) for _, keys_found in found)
        if not yes:
            return 2, (f"would delete {total} keys of namespace {keys.namespace!r} and start a new run; "
                       "run again with --yes")  # fmt: skip
        for c, keys_found in found:
            if keys_found:
                await c.delete(*keys_found)
        new = await reset_run(client, keys)
    finally:
        await close_partition_clients(clients, client)
        await client.aclose()
    return 0, f"namespace {keys.namespace!r}: {total} keys deleted, run {new.id} started after a data loss"


async def sglang_servers(config: RunConfig, *, attach: str, detach: str, producer: str) -> list[str]:
    """Edit `{ns}:sglang:{producer}` (the producer attaches or drains to match); its servers, one line each."""
    url = attach or detach
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"sglang: give the server's URL (http://host:port), not {url!r}")
    keys = Keys(config.bus.namespace)
    client = connect(config.redis)
    try:
        producer = producer or await _only_sglang_producer(client, keys, config.bus.heartbeat_ttl_s)
        key = keys.sglang_servers(producer)
        if attach:
            await client.sadd(key, url)
        elif detach and not await client.srem(key, url):
            raise ConfigError(f"producer {producer} does not drive {url}")
        members: Any = await client.smembers(key)
    finally:
        await client.aclose()
    return [f"{producer}\t{member}" for member in sorted(m.decode() for m in members)]


async def _only_sglang_producer(client: Any, keys: Keys, ttl_s: float) -> str:
    producers = [m.id for m in await alive_members(client, keys, ttl_s)
                 if m.role == "producer" and m.info.get("engine") == "sglang"]  # fmt: skip
    if len(producers) != 1:
        raise ConfigError(f"{len(producers)} live sglang producers ({', '.join(producers) or 'none'}): "
                          "name one with --producer")  # fmt: skip
    return producers[0]
