"""
The log of a background loop that carries on after a failed round (sync,
checkpoints, presence renewal, matchmaking passes): a failure that repeats
every tick is one line a minute with a count, not a line a tick, and an
unexpected error (a bug) is logged with its traceback instead of stopping
the loop.
"""

import collections

import txredisapi
from twisted.python.failure import Failure

from dreamraid.services.database import MYSQL_UNAVAILABLE
from dreamraid.services.rediscluster import ClusterBusy, ClusterUnavailable, RedisClusterError

# What a loop expects from Redis: the router's own errors and Redis's error
# replies (OOM, NOGROUP, WRONGTYPE, a script's error...).
REDIS_ERRORS = (RedisClusterError, txredisapi.ResponseError)

# A store that did not answer in time (a dead node, a failover, a full
# waiting line, MariaDB down): the request may be tried again later.  A
# write's outcome is then unknown (the router never sends it twice).
STORE_UNAVAILABLE = (ClusterUnavailable, ClusterBusy, *MYSQL_UNAVAILABLE)

# Seconds between two lines about the same failure of the same work.
LOG_EVERY = 60.0


def _kind(error):
    """C{"ResponseError NOGROUP"} for a Redis error reply, else the error's class name."""
    name = type(error).__name__
    if isinstance(error, txredisapi.ResponseError):
        return f"{name} {str(error).split(' ', 1)[0]}"
    return name


class FailureLog:
    """
    Logs one loop's failures.  The first failure of a kind (L{_kind}) in
    some work is logged at once; the same again within C{every} seconds is
    only counted, and the count goes on the next line about it.  An
    C{expected} error is one warning line; anything else is logged with its
    traceback.
    """

    def __init__(self, log, clock, expected=REDIS_ERRORS, every=LOG_EVERY):
        self._log = log
        self._clock = clock
        self._expected = expected
        self._every = every
        self._logged_at = {}  # (what, kind) -> when last logged
        self._unlogged = collections.Counter()  # (what, kind) -> failures since

    def failed(self, what, failure=None):
        """
        Note that C{what} (the line's start, e.g. C{"matchmaking: a pass
        failed"}) failed with C{failure} (by default the exception being
        handled); the caller carries on.
        """
        failure = failure or Failure()
        key = (what, _kind(failure.value))
        now = self._clock.seconds()
        last = self._logged_at.get(key)
        if last is not None and now - last < self._every:
            self._unlogged[key] += 1
            return
        self._logged_at[key] = now
        unlogged = self._unlogged.pop(key, 0)
        repeats = f" ({unlogged} more like it in the last {now - last:.0f} s)" if unlogged else ""
        if isinstance(failure.value, self._expected):
            self._log.warn("{what}: {error}{repeats}",
                           what=what, error=failure.value, repeats=repeats, count=unlogged + 1)
        else:
            self._log.failure("{what}: unexpected error{repeats}", failure,
                              what=what, repeats=repeats, count=unlogged + 1)
