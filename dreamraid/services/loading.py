"""
Entering the world: a logged-in user's data loaded from MySQL into the Redis
Cluster, and the token made the user's live session.

The session is claimed first, in the same step that asks whether the user's
data is still live (a user back before the sync of their last visit
finished).  Live data is newer than MySQL's and is kept.  Otherwise the user
is read from MySQL and written whole by one script, which writes nothing if a
live copy appeared meanwhile.  Because the session exists before MySQL is
read, the sync cannot unload the user in between, and a sync that finished
before it has already committed what MySQL returns.
"""

from typing import NamedTuple

from twisted.logger import Logger
from zope.interface import Interface, implementer

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.database import MYSQL_UNAVAILABLE
from dreamraid.services.livestore import Item, Profile
from dreamraid.services.rediscluster import RedisClusterError


class EnteredWorld(NamedTuple):
    user_id: int
    host: str
    port: int


class IProfileStore(Interface):
    """The durable profiles (MySQL)."""

    def load(user_id):
        """A Deferred of the user's L{Profile}, or C{None} if there is no such user."""


def thd_load_profile(connection, user_id):
    with connection.cursor() as cursor:
        cursor.execute("SELECT name, level, exp, data_version FROM users WHERE id = %s", (user_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        name, level, exp, version = row
        cursor.execute("SELECT tab, slot, item_code, enhancement, count FROM inventory WHERE user_id = %s",
                       (user_id,))
        items = {(tab, slot): Item(code, enhancement, count)
                 for tab, slot, code, enhancement, count in cursor.fetchall()}
        cursor.execute("SELECT score FROM best_scores WHERE user_id = %s", (user_id,))
        best = cursor.fetchone()
        return Profile(user_id, name, level, exp, best[0] if best else 0, version, items)


@implementer(IProfileStore)
class MysqlProfileStore:
    """L{IProfileStore} over a L{dreamraid.services.database.Database}'s pool."""

    def __init__(self, database):
        self._database = database

    def load(self, user_id):
        return self._database.run(thd_load_profile, user_id)


class World:
    """Turns a login token into a live session with the user's data in Redis."""

    _log = Logger()

    def __init__(self, verifier, live, profiles, queue, game_servers, random, session_ttl):
        """@param game_servers: the L{dreamraid.services.matchmaking.GameServers} players are handed to."""
        self._verifier = verifier
        self._live = live
        self._profiles = profiles
        self._queue = queue
        self._game_servers = game_servers
        self._random = random
        self._session_ttl = session_ttl

    async def enter(self, token):
        """
        An L{EnteredWorld} naming the game server to connect to.

        @raise RequestRefused: a bad token (its own code), an unknown user,
            or MySQL or Redis unavailable.
        """
        claims = self._verifier.verify(token)
        user_id = claims.user_id
        try:
            await self._queue.mark_live(user_id)
            if not await self._live.claim_session(user_id, claims.jti, self._session_ttl):
                await self._load(user_id, claims.jti)
        except (RedisClusterError, *MYSQL_UNAVAILABLE) as e:
            self._log.warn("enter world of user {user_id}: store unavailable: {error}", user_id=user_id, error=e)
            raise RequestRefused(ErrorCode.UNAVAILABLE) from None
        host, port = self._random.choice(await self._game_servers.alive())
        return EnteredWorld(user_id, host, port)

    async def _load(self, user_id, jti):
        """Load the user from MySQL; a session without data is ended, not left for a game server to find."""
        try:
            profile = await self._profiles.load(user_id)
            if profile is None:
                raise RequestRefused(ErrorCode.WRONG_CREDENTIALS, "the token's user no longer exists")
            await self._live.load(profile)
        except Exception:
            await self._live.end_session(user_id, jti)
            raise
