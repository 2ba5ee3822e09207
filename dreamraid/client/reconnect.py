"""
How the client library waits between attempts to reconnect: jittered
exponential backoff, capped, on an injected random source so tests can
predict it.
"""

import random

# The longest wait between two attempts, in seconds.
BACKOFF_CAP = 10.0


class Backoff:
    """
    The delay before attempt C{n} (0 first): C{first * factor**n} capped at
    C{cap}, of which a random half is taken off ("equal jitter"), so that
    many clients cut at once do not all come back in the same instant, and
    none waits more than C{cap}.
    """

    def __init__(self, rng=None, first=0.5, factor=2.0, cap=BACKOFF_CAP):
        self._rng = rng or random.Random()
        self.first, self.factor, self.cap = first, factor, cap

    def delay(self, attempt):
        ceiling = min(self.cap, self.first * self.factor ** min(attempt, 64))
        return self._rng.uniform(ceiling / 2, ceiling)
