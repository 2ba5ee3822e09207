"""
Health: named checks of what a server depends on (the Redis Cluster, MySQL),
each bounded by its own timeout, reported together for C{/health}.
"""

from twisted.internet import defer
from twisted.logger import Logger


class Unhealthy(Exception):
    """A dependency does not answer as it should; the message says how."""


class Health:
    """Runs every check at once and says which fail and why."""

    _log = Logger()

    def __init__(self, clock, checks):
        """
        @param checks: C{{name: (check, timeout)}} where C{check()} returns a
            Deferred or coroutine that fails when the dependency is unhealthy.
        """
        self._clock = clock
        self._checks = dict(checks)

    async def report(self):
        """C{{name: None}} for each healthy dependency, C{{name: reason}} for the rest."""
        names = list(self._checks)
        results = await defer.DeferredList(
            [self._run(name) for name in names], consumeErrors=True
        )
        return {name: (None if ok else _reason(value)) for name, (ok, value) in zip(names, results)}

    def _run(self, name):
        check, timeout = self._checks[name]
        d = defer.ensureDeferred(check())
        d.addTimeout(timeout, self._clock)
        return d


def _reason(failure):
    if failure.check(defer.TimeoutError):
        return "no answer in time"
    return str(failure.value) or failure.type.__name__
