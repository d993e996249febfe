"""The HTTP endpoint Prometheus scrapes: one per process, started and stopped by the app."""

from __future__ import annotations

import errno
import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server


class ExporterError(Exception):
    """The metrics endpoint could not start, with the reason and the fix."""


@dataclass(frozen=True)
class MetricsServer:
    host: str
    port: int  # the bound port: the real one when 0 was asked for
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # nosec B104 # a URL
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_server(
    registry: CollectorRegistry,
    host: str = "0.0.0.0",  # nosec B104 # scraped from other hosts; --metrics-host narrows it
    port: int = 8000,
) -> MetricsServer:
    """Serves `registry` at http://host:port/metrics from a daemon thread (port 0: any free)."""
    if not 0 <= port <= 65535:
        raise ExporterError(
            f"metrics port {port} is out of range: use 0-65535 (0 picks a free one)"
        )
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except socket.gaierror as error:
        raise ExporterError(
            f"cannot serve metrics on {host}:{port}: unknown host {host!r}; "
            "use an address of this machine such as 0.0.0.0 or 127.0.0.1"
        ) from error
    except OSError as error:
        reason = {
            errno.EADDRINUSE: "the port is already in use",
            errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
            errno.EACCES: "permission denied (ports below 1024 need privileges)",
        }.get(error.errno or 0, error.strerror or str(error))
        raise ExporterError(
            f"cannot serve metrics on {host}:{port}: {reason}; "
            "pick another port (0 picks a free one) or disable the exporter"
        ) from error
    return MetricsServer(host, server.server_address[1], server, thread)
