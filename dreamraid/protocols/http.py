"""
The HTTP side of each server: C{/health} answers 200 when every dependency
answers and 503 naming those that do not, as JSON; C{/metrics} serves the
Prometheus metrics.
"""

import json

from prometheus_client.twisted import MetricsResource
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET


class HealthResource(Resource):
    """C{GET /health}: C{{"status": "ok"|"unavailable", "checks": {name: "ok"|reason}}}."""

    isLeaf = True
    _log = Logger()

    def __init__(self, health):
        super().__init__()
        self._health = health

    def render_GET(self, request):
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.Deferred.fromCoroutine(self._health.report())
        d.addCallback(self._answer, request, gone)
        d.addErrback(self._failed, request, gone)
        return NOT_DONE_YET

    def _answer(self, failures, request, gone):
        if gone:
            return
        healthy = not any(failures.values())
        request.setResponseCode(200 if healthy else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        body = {
            "status": "ok" if healthy else "unavailable",
            "checks": {name: reason or "ok" for name, reason in failures.items()},
        }
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()

    def _failed(self, failure, request, gone):
        self._log.failure("health report failed", failure)
        if not gone:
            request.setResponseCode(500)
            request.finish()


def http_root(health, metrics=None):
    """The resource tree of a server's HTTP port: C{/health}, and C{/metrics} with a L{Metrics}."""
    root = Resource()
    root.putChild(b"health", HealthResource(health))
    if metrics is not None:
        root.putChild(b"metrics", MetricsResource(registry=metrics.registry))
    return root
