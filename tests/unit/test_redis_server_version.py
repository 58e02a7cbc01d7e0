"""What a server binary says it is (`--version`), parsed, and checked against a release."""

from __future__ import annotations

from pathlib import Path

import pytest

from miles_stream.errors import EmbeddedRedisError
from miles_stream.redis_server import ServerVersion, parse_server_version, server_version


def fake_server(tmp_path: Path, says: str) -> str:
    path = tmp_path / "redis-server"
    path.write_text(f"#!/bin/sh\necho '{says}'\n")
    path.chmod(0o755)
    return str(path)


def test_the_version_line_of_redis_and_of_valkey_gives_name_and_version() -> None:
    redis7 = "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0"
    valkey = "Valkey server v=8.1.8 sha=00000000:1 malloc=libc bits=64 build=7eb4ebc9d7e91f4e"
    assert parse_server_version(redis7) == ServerVersion("redis", "7.0.15")
    assert parse_server_version(valkey) == ServerVersion("valkey", "8.1.8")
    assert str(parse_server_version(valkey)) == "valkey 8.1.8"
    assert parse_server_version("something else") == ServerVersion("redis", "unknown")


def test_a_release_holds_its_own_versions_only() -> None:
    assert ServerVersion("redis", "7.0.15").is_release("redis", "7")
    assert ServerVersion("redis", "6.2.14").is_release("redis", "6.2")
    assert not ServerVersion("redis", "6.2.14").is_release("redis", "7")
    assert not ServerVersion("redis", "6.20.1").is_release("redis", "6.2")
    assert not ServerVersion("redis", "8.1.8").is_release("valkey", "8")
    assert not ServerVersion("redis", "unknown").is_release("redis", "7")


def test_server_version_asks_the_binary(tmp_path: Path) -> None:
    assert server_version(fake_server(tmp_path, "Redis server v=6.2.14 sha=40305114:0")) == ServerVersion(
        "redis", "6.2.14"
    )


def test_a_binary_that_cannot_run_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="--version failed"):
        server_version(str(tmp_path / "no-such-server"))
