"""Who may read /metrics, and where it is served.

Spend per caller and per backend is business data, so /metrics can be closed
two ways, alone or together:

- `KLEIN_METRICS_TOKEN`: every scrape must send `Authorization: Bearer <token>`
  (Prometheus: `authorization: {credentials: ...}` in the scrape job);
  anything else gets 401.
- `KLEIN_METRICS_PORT` (or `klein-gateway serve --metrics-port`): /metrics is
  served on that port only, by a small server in the `serve` process that
  reads every worker's figures from PROMETHEUS_MULTIPROC_DIR, and the API
  port answers 404 for it. Bind it to an internal interface with
  `--metrics-host`.

Neither set: /metrics is open on the API port, unless caller keys are
required (`KLEIN_GATEWAY_KEYS` or a keys file): then the API port answers 401
for it, since an open /metrics would show key names and per-caller spend to
anyone who can reach a gateway that otherwise asks for a key.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from wsgiref.simple_server import WSGIServer, make_server

from gateway.domain.errors import ConfigError
from gateway.settings import Settings

TOKEN_ENV: Final = "KLEIN_METRICS_TOKEN"
PORT_ENV: Final = "KLEIN_METRICS_PORT"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True, slots=True)
class MetricsAccess:
    token: str | None = field(default=None, repr=False)
    port: int | None = None  # served on its own port: the API port does not serve it
    keys_required: bool = False  # callers need a key: an unguarded /metrics on the API port is closed

    @property
    def closed(self) -> bool:
        """True when the API port must refuse /metrics outright: keys are required, and neither a token nor a port guards it."""
        return self.keys_required and self.token is None and self.port is None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MetricsAccess:
        """From `KLEIN_METRICS_TOKEN` and `KLEIN_METRICS_PORT`; a port that is not 1-65535 is a ConfigError."""
        settings = Settings.from_env(env)
        return cls(token=settings.metrics_token or None, port=parse_port(settings.metrics_port))

    def allows(self, authorization: str | None) -> bool:
        """True when no token is configured or the header carries it (compared in constant time)."""
        if self.token is None:
            return True
        scheme, _, given = (authorization or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())


def parse_port(value: str | int | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        port = int(value)
    except ValueError:
        raise ConfigError(f"{PORT_ENV} must be a port number, not {value!r}") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{PORT_ENV} must be from 1 to 65535, not {port}")
    return port


UNAUTHORIZED_BODY: Final = b'{"error":{"message":"/metrics needs Authorization: Bearer <KLEIN_METRICS_TOKEN>","type":"authentication_error","param":null,"code":"invalid_metrics_token"}}'


def guarded(app: WsgiApp, access: MetricsAccess) -> WsgiApp:
    """`app` behind the bearer token; only GET /metrics is served."""

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"not found; scrape /metrics\n"]
        if not access.allows(environ.get("HTTP_AUTHORIZATION")):
            start_response("401 Unauthorized", [("content-type", "application/json"), ("www-authenticate", 'Bearer realm="metrics"')])
            return [UNAUTHORIZED_BODY]
        return app(environ, start_response)

    return wrapped


def serve_metrics(host: str, port: int, access: MetricsAccess, multiproc_dir: str) -> tuple[WSGIServer, threading.Thread]:
    """Serve every worker's figures (summed from `multiproc_dir`) on host:port in a daemon thread.

    Import only after PROMETHEUS_MULTIPROC_DIR is set: prometheus_client picks
    its value store when first imported."""
    from prometheus_client import CollectorRegistry, make_wsgi_app, multiprocess
    from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    server = make_server(host, port, guarded(make_wsgi_app(registry), access), ThreadingWSGIServer, handler_class=_SilentHandler)
    thread = threading.Thread(target=server.serve_forever, name="klein-metrics", daemon=True)
    thread.start()
    return server, thread
