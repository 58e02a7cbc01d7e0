"""A process's Prometheus endpoint: `metrics.port` > 0 serves http://{metrics.host}:{port}/metrics.

Nothing is counted here: a `collect` function reads what the process's components already count, at scrape
time (`status/exporter.py` builds one per role). Each server has a registry of its own, never the library's
global one, so several can live in one process (tests). Names and dashboards: docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from miles_stream.errors import ConfigError

log = structlog.get_logger(__name__)

Collect = Callable[[], Iterable[Metric]]


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    port: int = 0  # 0: no endpoint. Each process on one host needs a port of its own (metrics.port=9101 ...)
    host: str = "127.0.0.1"  # 0.0.0.0 to be scraped from another host

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.port={self.port}: a TCP port (1-65535), or 0 for no endpoint")
        if not self.host:
            raise ConfigError("metrics.host is empty: 127.0.0.1 (this host only) or 0.0.0.0 (any interface)")


class _Reader(Collector):
    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class MetricsServer:
    """Serves `collect()` on its own thread while started; `stop()` is idempotent; also `async with`."""

    def __init__(self, config: MetricsConfig, collect: Collect) -> None:
        self.config = config
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Reader(collect))
        self._server: Any = None

    @property
    def port(self) -> int:
        """The port served (the configured one); 0 while stopped."""
        return int(self._server.server_port) if self._server is not None else 0

    def start(self) -> None:
        if self.config.port == 0 or self._server is not None:
            return
        try:
            self._server, _ = start_http_server(self.config.port, addr=self.config.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.port={self.config.port} on {self.config.host}: {exc.strerror or exc} "
                              "(each process on a host needs a port of its own)") from exc  # fmt: skip
        log.info("metrics_serving", url=f"http://{self.config.host}:{self.port}/metrics")

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    async def __aenter__(self) -> MetricsServer:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
