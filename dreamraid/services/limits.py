"""
Abuse limits of a server's client connections: token buckets per connection
and message type, and a cap on the connections one address holds.  The
protocol asks before it dispatches; these never see bytes.
"""

from typing import NamedTuple


class Rate(NamedTuple):
    """A token bucket's refill (requests a second) and size (the burst)."""

    per_second: float
    burst: float


class RequestBuckets:
    """
    One connection's token buckets, one a message name, made full on first
    use: C{allow(name)} takes a token if there is one.  C{rates} maps names
    to L{Rate}s, C{"*"} for every other message; a message with no rate and
    no C{"*"} is never limited.
    """

    __slots__ = ("_clock", "_rates", "_buckets")

    def __init__(self, clock, rates):
        self._clock = clock
        self._rates = rates
        self._buckets = {}  # name -> [tokens, last refill time, its Rate]

    def allow(self, name):
        now = self._clock.seconds()
        bucket = self._buckets.get(name)
        if bucket is None:
            rate = self._rates.get(name) or self._rates.get("*")
            if rate is None:
                return True
            bucket = self._buckets[name] = [rate.burst, now, rate]
        tokens, last, rate = bucket
        tokens = min(rate.burst, tokens + (now - last) * rate.per_second)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True


class AddressCap:
    """
    How many connections each address holds, and whether one more is let in:
    at most C{limit} an address (0: no cap).
    """

    def __init__(self, limit):
        self.limit = limit
        self._held = {}

    def admit(self, address):
        """Count one more connection of C{address} and return True, or return False if it is at the cap."""
        held = self._held.get(address, 0)
        if self.limit and held >= self.limit:
            return False
        self._held[address] = held + 1
        return True

    def release(self, address):
        """An admitted connection of C{address} closed."""
        held = self._held[address] - 1
        if held:
            self._held[address] = held
        else:
            del self._held[address]

    def held(self, address):
        return self._held.get(address, 0)


class TokenBucket:
    """
    One token bucket at a L{Rate}, full at first: C{allow(now)} takes a token
    if there is one.  Cheap enough to ask for every datagram.
    """

    __slots__ = ("_per_second", "_burst", "_tokens", "_last")

    def __init__(self, rate, now):
        self._per_second, self._burst = rate
        self._tokens, self._last = rate.burst, now

    def allow(self, now):
        tokens = min(self._burst, self._tokens + (now - self._last) * self._per_second)
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
