"""
A server's Prometheus metrics, served at C{/metrics} on its HTTP port.

The hot paths count into prometheus_client's own counters and histograms
(a label's child looked up once and kept); what the services already count
themselves (the Redis router, the raid host, liveness) is read when
Prometheus scrapes, by a collector, so it costs nothing in between.  What
takes Redis calls to know (the sync backlog, the matchmaking queues) is
sampled every few seconds.  The reactor's lag is how late a timer set every
half second fires.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from dreamraid.errors import ErrorCode

LAG_INTERVAL = 0.5
SAMPLE_INTERVAL = 5.0
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics(Service):
    """
    The metrics of one server process, in a registry of its own (tests run
    several servers in one process).  C{watch(name, function)} adds a value
    read at each scrape: C{function()} returns C{{labels tuple: value}} or a
    number.
    """

    _log = Logger()

    def __init__(self, clock, server):
        self._clock = clock
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.received = Counter("dreamraid_messages_received", "Requests received, by message", ["message"], **labels)
        self.sent = Counter("dreamraid_messages_sent", "Replies and pushes sent, by message", ["message"], **labels)
        self.errors = Counter("dreamraid_errors", "Error replies sent, by code", ["code"], **labels)
        self.latency = Histogram("dreamraid_request_seconds", "Seconds from a request to its reply, by message",
                                 ["message"], buckets=_LATENCY_BUCKETS, **labels)
        self.redis_latency = Histogram("dreamraid_redis_call_seconds", "Seconds from a Redis command sent to its reply",
                                       buckets=_LATENCY_BUCKETS, **labels)
        self.lag = Histogram("dreamraid_reactor_lag_seconds", "How late a timer fires: time the reactor was busy",
                             buckets=_LATENCY_BUCKETS, **labels)
        Gauge("dreamraid_server_info", "This server process", ["server"], **labels).labels(server).set(1)
        self._watched = _Watched()
        self.registry.register(self._watched)
        self._children = {}
        self._lagging = None
        self._samplers = []

    def histogram(self, name, documentation, labels=()):
        """A histogram of seconds in this server's registry."""
        return Histogram(name, documentation, list(labels), buckets=_LATENCY_BUCKETS, registry=self.registry)

    def gauge(self, name, documentation, labels=()):
        """A gauge in this server's registry."""
        return Gauge(name, documentation, list(labels), registry=self.registry)

    def every(self, function):
        """
        Call the coroutine function C{function()} (which sets gauges) every
        SAMPLE_INTERVAL while the server runs; a failed sample is logged and
        taken again next time, the gauges keeping their values.
        """
        async def take():
            try:
                await function()
            except Exception as e:
                self._log.warn("metrics: cannot sample {what}: {error}", what=function.__name__, error=e)
        loop = task.LoopingCall(lambda: defer.ensureDeferred(take()))
        loop.clock = self._clock
        self._samplers.append(loop)

    def watch(self, name, documentation, kind, function, label=None):
        """Report C{function()} at each scrape as C{name} (C{kind} "counter" or "gauge")."""
        self._watched.add(name, documentation, kind, function, label)

    def watch_router(self, router):
        """The Redis router's call latency, and its redirects, retries, refreshes and errors by kind."""
        router.latency = self.redis_latency
        self.watch("dreamraid_redis_events", "Redis router events: moved, ask, retries, refreshes, errors...",
                   "counter", lambda: dict(router.counters), "kind")

    def request(self, message):
        """A request of C{message} arrived: the children to count it and time it."""
        children = self._children.get(message.id)
        if children is None:
            children = self._children[message.id] = (
                self.received.labels(message.name), self.latency.labels(message.name))
        children[0].inc()
        return children[1]

    def replied(self, message):
        self.sent.labels(message.name).inc()

    def refused(self, code):
        """An error reply with C{code} went out."""
        self.errors.labels(_code_name(code)).inc()

    def now(self):
        return self._clock.seconds()

    def startService(self):
        super().startService()
        expected = [self._clock.seconds() + LAG_INTERVAL]

        def fired():
            now = self._clock.seconds()
            self.lag.observe(max(0.0, now - expected[0]))
            expected[0] = now + LAG_INTERVAL
        self._lagging = task.LoopingCall(fired)
        self._lagging.clock = self._clock
        self._lagging.start(LAG_INTERVAL, now=False)
        for loop in self._samplers:
            loop.start(SAMPLE_INTERVAL)

    def stopService(self):
        super().stopService()
        for loop in [self._lagging, *self._samplers]:
            if loop is not None and loop.running:
                loop.stop()


class _Watched:
    """A collector of values the services keep themselves, read at each scrape."""

    def __init__(self):
        self._entries = []

    def add(self, name, documentation, kind, function, label):
        self._entries.append((name, documentation, kind, function, label))

    def collect(self):
        for name, documentation, kind, function, label in self._entries:
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, documentation, labels=[label] if label else None)
            value = function()
            if label:
                for key, number in sorted(value.items()):
                    family.add_metric([str(key)], number)
            else:
                family.add_metric([], value)
            yield family


def _code_name(code):
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
