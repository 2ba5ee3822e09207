"""
The ranking board: each user's best raid score in one Redis sorted set
(C{<prefix>:board}, members are user ids) with their names beside it
(C{<prefix>:names}); the prefix is C{[sync] ranking_prefix}.  Ranks are
competition ranks: equal scores share a rank and the next rank skips past
them ("1, 2, 2, 4"); among equal scores a page lists them in the sorted
set's order (user ids compared as text, descending).

MySQL's C{best_scores} is the durable copy, written by the sync with the
rest of the profile; the session server's L{BoardLoader} puts the board
back from it whenever Redis has none (a new cluster, or a lost one).
"""

from typing import NamedTuple

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.database import MYSQL_UNAVAILABLE, MySQLError
from dreamraid.services.deferreds import gather
from dreamraid.services.rediscluster import RedisClusterError, Script

PAGE_LIMIT = 100
# Entries written to Redis in one command when loading the board.
_CHUNK = 1000

# KEYS: board.  ARGV: first position (1-based), count.
# {rank of the first entry, id, score, id, score...}, or {0} past the end.
_PAGE = """
local entries = redis.call('ZREVRANGE', KEYS[1], ARGV[1] - 1, ARGV[1] + ARGV[2] - 2, 'WITHSCORES')
if #entries == 0 then return {0} end
local higher = redis.call('ZCOUNT', KEYS[1], '(' .. entries[2], '+inf')
local reply = {higher + 1}
for i = 1, #entries do reply[i + 1] = entries[i] end
return reply
"""

# KEYS: board.  ARGV: user id.  {rank, score}, or {0, 0} when not on the board.
_OWN = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return {0, 0} end
return {redis.call('ZCOUNT', KEYS[1], '(' .. score, '+inf') + 1, score}
"""


class Entry(NamedTuple):
    rank: int
    user_id: int
    name: str
    score: int


class OwnRank(NamedTuple):
    """A user's place on the board; rank 0 when they have no score yet."""

    rank: int
    score: int


class Ranking:
    """Reads and raises the board; every method returns a Deferred."""

    def __init__(self, router, prefix):
        self._router = router
        self.board, self.names = f"{prefix}:board", f"{prefix}:names"
        self._page = Script(router, _PAGE)
        self._own = Script(router, _OWN)

    def record(self, scores):
        """
        Raise the best score of each C{(user_id, name, score)} to C{score}
        where that is higher (a lower one changes nothing, so replaying is
        harmless).
        """
        calls = []
        for start in range(0, len(scores), _CHUNK):
            chunk = scores[start:start + _CHUNK]
            calls.append(self._router.execute("ZADD", self.board, "GT", *[v for u, _, s in chunk for v in (s, u)]))
            calls.append(self._router.execute("HSET", self.names, *[v for u, n, _ in chunk for v in (u, n)]))
        return gather(calls)

    async def page(self, first, count):
        """
        The entries at positions C{first} to C{first + count - 1} (from 1),
        best first.  @raise RequestRefused: BAD_RANGE for a first position
        below 1 or a count outside 1 to 100.
        """
        if first < 1 or not 1 <= count <= PAGE_LIMIT:
            raise RequestRefused(ErrorCode.BAD_RANGE, f"first from 1, count from 1 to {PAGE_LIMIT}")
        reply = await self._page([self.board], [first, count])
        flat = reply[1:]
        ids = [int(flat[i]) for i in range(0, len(flat), 2)]
        if not ids:
            return []
        names = await self._router.execute("HMGET", self.names, *ids)
        entries, rank, previous = [], int(reply[0]), None
        for position, (user_id, name, score) in enumerate(zip(ids, names, flat[1::2]), first):
            score = int(score)
            if previous is not None and score != previous:
                rank = position
            entries.append(Entry(rank, user_id, (name or b"").decode(), score))
            previous = score
        return entries

    async def own(self, user_id):
        """The user's L{OwnRank}."""
        rank, score = await self._own([self.board], [user_id])
        return OwnRank(int(rank), int(score))

    async def is_empty(self):
        return not await self._router.execute("EXISTS", self.board)


def thd_best_scores(cursor, after, limit):
    """Up to C{limit} C{(user_id, name, score)} with user ids above C{after}, in id order."""
    cursor.execute(
        "SELECT b.user_id, u.name, b.score FROM best_scores b JOIN users u ON u.id = b.user_id "
        "WHERE b.user_id > %s ORDER BY b.user_id LIMIT %s", (after, limit))
    return [(user_id, name, score) for user_id, name, score in cursor.fetchall()]


class BoardLoader(Service):
    """
    Puts the board back from MySQL when Redis has none: at start and then
    every C{interval} seconds, so a cluster lost while the servers run gets
    its board back too.  Scores only ever rise on the board, so a load that
    races a raid's result loses nothing.
    """

    _log = Logger()

    def __init__(self, ranking, database, clock, interval, chunk=5000):
        self._ranking = ranking
        self._database = database
        self._clock = clock
        self._interval = interval
        self._chunk = chunk
        self._checks = None
        self.checking = defer.succeed(None)  # the timer's latest check: it fires when that check is done

    def startService(self):
        super().startService()
        self._checks = task.LoopingCall(self._timed_check)
        self._checks.clock = self._clock
        self._checks.start(self._interval)

    def stopService(self):
        super().stopService()
        if self._checks.running:
            self._checks.stop()

    def _timed_check(self):
        self.checking = defer.ensureDeferred(self.check())
        return self.checking

    async def check(self):
        """Load the board if Redis has none; the number of scores loaded.  Failures are logged, not raised."""
        try:
            if not await self._ranking.is_empty():
                return 0
            loaded, after = 0, 0
            while True:
                rows = await self._database.interact(thd_best_scores, after, self._chunk)
                if not rows:
                    break
                await self._ranking.record(rows)
                loaded, after = loaded + len(rows), rows[-1][0]
        except (RedisClusterError, MySQLError, *MYSQL_UNAVAILABLE) as e:
            self._log.warn("ranking: cannot check or load the board ({error}); trying again later", error=e)
            return 0
        if loaded:
            self._log.info("ranking: loaded {count} best scores back from MySQL", count=loaded)
        return loaded
