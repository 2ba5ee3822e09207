"""
A server's Prometheus metrics, served at C{/metrics} on its HTTP port.

The hot paths count into plain integers and L{Buckets} (prometheus_client's
own counters take a lock on every increment, which the one reactor thread
does not need and which cost the game server a quarter of its ping rate in
bench/metrics_overhead.py); they, and what the services already count
themselves (the Redis router, the raid host, liveness), are turned into
metric families only when Prometheus scrapes.  What
takes Redis calls to know (the sync backlog, the matchmaking queues) is
sampled every few seconds.  The reactor's lag is how late a timer set every
half second fires.
"""

import bisect
import collections

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets

LAG_INTERVAL = 0.5
SAMPLE_INTERVAL = 5.0
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics(Service):
    """
    The metrics of one server process, in a registry of its own (tests run
    several servers in one process).  C{watch(...)} adds a value read at
    each scrape: C{function()} returns C{{label value: number}} or a number.
    """

    _log = Logger()

    def __init__(self, clock, server):
        self._clock = clock
        self.registry = CollectorRegistry()
        self.sent = {}  # message name -> pushes, and replies other than their request's usual one
        self.errors = collections.Counter()  # error code name -> error replies
        self.latency = LabelledBuckets(RequestBuckets)  # request message name -> seconds to reply, and replies
        self.redis_latency = Buckets()
        self.lag = Buckets()
        Gauge("dreamraid_server_info", "This server process", ["server"], registry=self.registry).labels(server).set(1)
        self._watched = _Watched()
        self._watched.add("dreamraid_messages_received", "Requests received and answered, by message", "counter",
                          lambda: {name: buckets.total() for name, buckets in self.latency.children.items()},
                          "message")
        self._watched.add("dreamraid_messages_sent", "Replies and pushes sent, by message", "counter",
                          self._sent_counts, "message")
        self._watched.add("dreamraid_errors", "Error replies sent, by code", "counter", lambda: self.errors, "code")
        self._watched.add_histogram("dreamraid_request_seconds", "Seconds from a request to its reply, by message",
                                    self.latency, "message")
        self._watched.add_histogram("dreamraid_redis_call_seconds", "Seconds from a Redis command sent to its reply",
                                    self.redis_latency)
        self._watched.add_histogram("dreamraid_reactor_lag_seconds",
                                    "How late a timer fires: time the reactor was busy", self.lag)
        self.registry.register(self._watched)
        self._lagging = None
        self._samplers = []
        self.answered = self._answering()

    def _answering(self):
        """
        C{answered(request, reply, started)}: a request of message
        C{request} that arrived at C{started} was answered; it is counted
        and timed, and its C{reply} message (None for an error or no reply)
        counted.  The one call a request makes, so it is lean (instructions
        per ping under callgrind, 4,040 before these, about 2,500 after): a
        closure, not a method reading this service's attributes; buckets
        found by message id in a list, not by name in a dict; no search for
        the first bucket; and a request's usual reply counted in its
        buckets, not in a dict by name.
        """
        now, labels = self._clock.seconds, self.latency.labels
        by_id = [None] * (max(packets.MESSAGES) + 1)
        first, bounds, bisect_left = _LATENCY_BUCKETS[0], _LATENCY_BUCKETS, bisect.bisect_left

        def first_of(request):
            buckets = by_id[request.id] = labels(request.name)
            return buckets

        def other_reply(buckets, reply):
            if buckets.reply is None:
                buckets.reply = reply
                buckets.replies = 1
            else:
                self.replied(reply)

        def answered(request, reply, started):
            seconds = now() - started
            buckets = by_id[request.id] or first_of(request)
            if seconds <= first:
                buckets.counts[0] += 1
            else:
                buckets.counts[bisect_left(bounds, seconds)] += 1
            buckets.sum += seconds
            if reply is not None:
                if reply is buckets.reply:
                    buckets.replies += 1
                else:
                    other_reply(buckets, reply)
        return answered

    def _sent_counts(self):
        """Replies and pushes sent, by message name."""
        counts = dict(self.sent)
        for buckets in self.latency.children.values():
            if buckets.replies:
                counts[buckets.reply.name] = counts.get(buckets.reply.name, 0) + buckets.replies
        return counts

    def histogram(self, name, documentation, label=None):
        """Seconds to observe (by C{label}'s value, with C{.labels(value)}, if given), exposed as a histogram."""
        buckets = LabelledBuckets() if label else Buckets()
        self._watched.add_histogram(name, documentation, buckets, label)
        return buckets

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

    def replied(self, message):
        """A C{message} went out that no request's usual reply counts: a push, or another reply."""
        self.sent[message.name] = self.sent.get(message.name, 0) + 1

    def refused(self, code):
        """An error reply with C{code} went out."""
        self.errors[_code_name(code)] += 1

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


class Buckets:
    """A histogram of seconds without locks, for the reactor thread: counts per bucket, their sum."""

    __slots__ = ("counts", "sum")
    BOUNDS = _LATENCY_BUCKETS

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, seconds):
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.sum += seconds

    def total(self):
        return sum(self.counts)

    def cumulative(self):
        """C{[(le, count up to it)]}, +Inf last, as the exposition wants."""
        total, out = 0, []
        for bound, count in zip([*map(str, self.BOUNDS), "+Inf"], self.counts):
            total += count
            out.append((bound, total))
        return out


class RequestBuckets(Buckets):
    """The seconds to reply to one request message, and how many times it had its usual C{reply} (the first seen)."""

    __slots__ = ("reply", "replies")

    def __init__(self):
        super().__init__()
        self.reply = None
        self.replies = 0


class LabelledBuckets:
    """L{Buckets} (or C{kind}) by one label's value, made on first use."""

    def __init__(self, kind=Buckets):
        self.children = {}
        self._kind = kind

    def labels(self, value):
        buckets = self.children.get(value)
        if buckets is None:
            buckets = self.children[value] = self._kind()
        return buckets


class _Watched:
    """A collector of values kept by the code itself, read at each scrape."""

    def __init__(self):
        self._entries = []
        self._histograms = []

    def add(self, name, documentation, kind, function, label):
        self._entries.append((name, documentation, kind, function, label))

    def add_histogram(self, name, documentation, buckets, label=None):
        self._histograms.append((name, documentation, buckets, label))

    def collect(self):
        for name, documentation, buckets, label in self._histograms:
            family = HistogramMetricFamily(name, documentation, labels=[label] if label else None)
            for value, child in (sorted(buckets.children.items()) if label else [((), buckets)]):
                family.add_metric([str(value)] if label else [], child.cumulative(), child.sum)
            yield family
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
