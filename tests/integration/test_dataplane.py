"""The hand-written data-plane client against real servers: replies, errors, auth, lost connections."""

from __future__ import annotations

import os

import pytest
import redis
import redis.exceptions as rexc

from miles_stream.bus import RedisConfig, open_stream_client
from miles_stream.bus.dataplane import RespConnection, ThreadedStreamClient
from miles_stream.redis_server import EmbeddedRedis, EmbeddedRedisConfig


def conn(url: str) -> RespConnection:
    return RespConnection(url, connect_timeout_s=2, timeout_s=5)


def ping_once(url: str) -> object:
    c = conn(url)
    try:
        return c.command("PING")
    finally:
        c.close()


def test_every_reply_kind_parses_like_redis_py(redis_url: str) -> None:
    c = conn(redis_url)
    big = os.urandom(3 << 20)
    assert c.command("SET", "dp:k", big) == b"OK"
    assert bytes(c.command("GET", "dp:k")) == big
    assert c.command("GET", "dp:missing") is None
    assert c.command("DEL", "dp:k", "dp:missing") == 1
    assert c.command("RPUSH", "dp:l", "a", "bb", "") == 3
    assert c.command("LRANGE", "dp:l", 0, -1) == [b"a", b"bb", b""]
    assert c.command("PING") == b"PONG"
    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
        c.command("GET", "dp:l")
    assert c.command("PING") == b"PONG"  # the connection is still in step after an error reply
    c.close()


def test_header_lines_longer_than_the_buffer_are_read_whole(redis_url: str) -> None:
    c = conn(redis_url)
    status = "x" * 200_000
    c.command("SET", "dp:long", status)
    assert c.command("GET", "dp:long") == status.encode()
    many = [str(i) for i in range(20_000)]
    c.command("RPUSH", "dp:many", *many)
    assert c.command("LRANGE", "dp:many", 0, -1) == [m.encode() for m in many]
    c.close()


async def test_xreadgroup_and_xadd_mirror_redis_py(redis_url: str) -> None:
    fast = open_stream_client(RedisConfig(url=redis_url), block_ms=50)
    assert isinstance(fast, ThreadedStreamClient)
    slow = redis.asyncio.Redis.from_url(redis_url)
    await slow.xgroup_create("dp:s", "g", id="0", mkstream=True)
    payload = os.urandom(1 << 20)
    entry_id = await fast.xadd("dp:s", {b"d": payload, "x": "1"}, maxlen=1000)
    reply = await fast.xreadgroup("g", "c", {"dp:s": ">"}, count=5, block=50)
    assert reply[0][0] == b"dp:s"
    ((got_id, fields),) = reply[0][1]
    assert got_id == entry_id and bytes(fields[b"d"]) == payload and fields[b"x"] == b"1"
    assert await fast.xreadgroup("g", "c", {"dp:s": ">"}, count=5, block=50) == []
    await slow.xdel("dp:s", entry_id)
    history = await fast.xreadgroup("g", "c", {"dp:s": "0"}, count=5)
    assert history[0][1] == [(entry_id, {})]  # deleted while pending: id without fields
    with pytest.raises(rexc.ResponseError, match="NOGROUP"):
        await fast.xreadgroup("nogroup", "c", {"dp:s": ">"}, count=1)
    await fast.aclose()
    await slow.aclose()


def test_password_in_the_url_authenticates(tmp_path: object) -> None:
    with EmbeddedRedis(EmbeddedRedisConfig(persistence="none")) as server:
        with redis.Redis.from_url(server.url) as admin:
            admin.config_set("requirepass", "s3cret")
        with pytest.raises(rexc.AuthenticationError):
            ping_once(server.url)
        url = server.url.replace("redis://", "redis://:s3cret@")
        assert ping_once(url) == b"PONG"
        with redis.Redis.from_url(url) as admin:
            admin.acl_setuser("bus", enabled=True, passwords=["+pw"], commands=["+ping"], keys=["*"])
        assert ping_once(server.url.replace("redis://", "redis://bus:pw@")) == b"PONG"


def test_a_cut_connection_raises_connection_error_then_reconnects(redis_url: str) -> None:
    c = conn(redis_url)
    assert c.command("PING") == b"PONG"
    with redis.Redis.from_url(redis_url) as admin:
        admin.client_kill_filter(_type="normal", skipme=True)
    with pytest.raises(rexc.ConnectionError):
        c.command("PING")
    assert c.command("PING") == b"PONG"
    c.close()


def test_no_server_is_a_connection_error() -> None:
    with pytest.raises(rexc.ConnectionError, match="cannot connect"):
        conn("redis://127.0.0.1:1/0").command("PING")


def test_tls_urls_use_redis_py() -> None:
    client = open_stream_client(RedisConfig(url="rediss://127.0.0.1:1/0"))
    assert isinstance(client, redis.asyncio.Redis)
