"""
The players connected to one game server process: authentication with the
live-session check, one connection per user across every process (the
newest authentication wins, also with the same token), presence renewal, and
what happens when a player leaves.
"""

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.deferreds import gather
from dreamraid.services.failurelog import REDIS_ERRORS, FailureLog
from dreamraid.services.health import Unhealthy
from dreamraid.services.presence import Left, holder_number
from dreamraid.services.rediscluster import RedisClusterError


class IPlayerConnection(Interface):
    """What L{Players} needs of a client connection."""

    user_id = Attribute("the authenticated user's id, or None")
    jti = Attribute("the id of the token it authenticated with, or None")
    holder = Attribute("its authentication's presence (L{dreamraid.services.presence.Entered.holder}), or None")

    def kick(code):
        """Close the connection after telling the client C{code}."""

    def push(event, body):
        """Send the client C{event} (a name the protocol knows, such as C{"party_changed"}) with C{body}."""


# Each connection's session and presence are renewed every third of the
# presence TTL, a hundredth of the connections at a time: renewing them all at
# once held every request up behind thousands of Redis calls.
RENEWAL_SLICES = 100


class Players(Service):
    """The authenticated connections of this process, by user."""

    _log = Logger()

    def __init__(self, verifier, presence, queue, clock, presence_ttl):
        self._verifier = verifier
        self._presence = presence
        self._queue = queue
        self._clock = clock
        self._presence_ttl = presence_ttl
        self._connections = {}
        self._slices = [{} for _ in range(RENEWAL_SLICES)]  # user id % RENEWAL_SLICES -> {user id: connection}
        self._ticks = 0
        self._renewals = None
        self._kicks = None
        self._failures = FailureLog(self._log, clock)
        self._handoff_waits = set()  # Deferreds of closed connections' players moving to a raid's host

    def __len__(self):
        return len(self._connections)

    def startService(self):
        super().startService()
        self._kicks = self._presence.listen(self.taken_over, self.notified)
        self._renewals = task.LoopingCall.withCount(self._renew_slices)
        self._renewals.clock = self._clock
        self._renewals.start(self._presence_ttl / 3 / RENEWAL_SLICES, now=False)

    def stopService(self):
        super().stopService()
        if self._renewals.running:
            self._renewals.stop()
        for wait in list(self._handoff_waits):
            wait.cancel()
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        """Let every player go (their data is synced) and close their connections, before Redis goes."""
        connections = list(self._connections.values())
        await gather([self.leave(c, wait_for_handoff=False) for c in connections])
        for connection in connections:
            connection.user_id = None
            connection.kick(ErrorCode.SHUTTING_DOWN)
        await self._kicks.stop()

    async def check_kicks(self):
        """For health: fail unless this process hears kicks from the others right now."""
        if self._kicks is None or not self._kicks.subscribed:
            raise Unhealthy("not subscribed to kicks from other game servers")

    def when_listening(self):
        """A Deferred that fires once this process hears kicks from the others."""
        return self._kicks.when_subscribed()

    async def authenticate(self, connection, token):
        """
        Verify C{token}, check it is the live session and take the user over
        (closing any other connection of theirs, here or elsewhere); a
        L{dreamraid.services.presence.Entered}.

        @raise RequestRefused: a bad token, a token that is not the live session, Redis down.
        """
        claims = self._verifier.verify(token)
        return await self._take_over(connection, claims.user_id, claims.jti, self._presence.enter)

    async def authenticate_handoff(self, connection, user_id, ticket):
        """
        Take the user over with the handoff ticket a raid's host gave them
        (their token may have expired since login); an L{Entered}.

        @raise RequestRefused: a used, expired or wrong ticket; Redis down.
        """
        return await self._take_over(connection, user_id, ticket, self._presence.enter_handoff)

    async def _take_over(self, connection, user_id, jti, enter):
        try:
            entered = await enter(user_id, jti)
        except RedisClusterError as e:
            self._log.warn("authenticate user {user_id}: {error}", user_id=user_id, error=e)
            raise RequestRefused(ErrorCode.UNAVAILABLE) from None
        older = self._connections.get(user_id)
        if older is not None and older is not connection:
            if holder_number(older.holder) > holder_number(entered.holder):
                # A later authentication here was registered first: this one is already replaced.
                raise RequestRefused(ErrorCode.LOGGED_IN_ELSEWHERE)
            older.kick(ErrorCode.LOGGED_IN_ELSEWHERE)
        connection.user_id, connection.jti, connection.holder = user_id, jti, entered.holder
        self._connections[user_id] = self._slices[user_id % RENEWAL_SLICES][user_id] = connection
        return entered

    def connection_of(self, user_id):
        """The user's connection to this process, or None."""
        return self._connections.get(user_id)

    def taken_over(self, user_id, holder):
        """Another process took C{user_id} over from the authentication C{holder}: close its connection here."""
        connection = self._connections.get(user_id)
        if connection is not None and connection.holder == holder:
            connection.kick(ErrorCode.LOGGED_IN_ELSEWHERE)

    def notified(self, user_ids, event, body):
        """Another process (or this one) told users of this one C{event}: push it to those still here."""
        for user_id in user_ids:
            connection = self._connections.get(user_id)
            if connection is not None:
                connection.push(event, body)

    async def leave(self, connection, leave_game=None, wait_for_handoff=True):
        """
        The connection logged out or went away.  If a newer authentication
        of the user (here or on another process, with any token, a raid
        handoff among them) replaced it, nothing ends: the player goes on
        there.  Otherwise end its session if it is still the live one, run
        C{leave_game(user_id)} (an async callable: the player's ticket and
        party go; also when Redis did not answer, as the player is most
        likely gone), then have the user's data written back.  What the
        leave found, a L{dreamraid.services.presence.Left}, or None if Redis
        did not answer or this service stopped while it waited.

        With C{wait_for_handoff} (a connection that closed, not a logout),
        one whose player has a raid handoff ticket waiting ends nothing yet:
        the player is moving to the raid's host, and the old connection may
        close before the new one arrives there.  The session is kept until
        the ticket is used (the leave then finds the connection replaced) or
        expires, then ended only if still this connection's.
        """
        user_id = connection.user_id
        if self._connections.get(user_id) is connection:
            del self._connections[user_id]
            del self._slices[user_id % RENEWAL_SLICES][user_id]
        wait_for_handoff = wait_for_handoff and self.running  # stopping lets every player go at once
        try:
            left = await self._presence.leave(user_id, connection.jti, connection.holder, wait_for_handoff)
            while not isinstance(left, Left):  # the seconds a handoff ticket still waits
                self._log.info("user {user_id}: a connection closed while a raid handoff ticket waits; the "
                               "session waits {seconds:.1f} s for the player to move", user_id=user_id, seconds=left)
                await self._waiting_for_handoff(left)
                left = await self._presence.leave(user_id, connection.jti, connection.holder, wait_for_handoff)
        except defer.CancelledError:
            return None  # stopping: the session expires by itself and the next checkpoint syncs the user
        except REDIS_ERRORS as e:
            # The session expires by itself and the next checkpoint syncs the user.
            self._log.warn("user {user_id} left, but Redis did not hear it: {error}", user_id=user_id, error=e)
            left = None
        if left is Left.REPLACED:
            self._log.info("user {user_id}: a replaced connection closed (a newer connection or a raid's host has "
                           "the player); nothing ended, the party and any ticket stay", user_id=user_id)
            return left
        if leave_game is not None:
            await leave_game(user_id)
        if left is Left.ENDED:
            try:
                await self._queue.enqueue(user_id, "logout")
            except REDIS_ERRORS as e:
                self._log.warn("user {user_id} left, but their sync was not queued: {error}", user_id=user_id, error=e)
        return left

    def _waiting_for_handoff(self, seconds):
        """A Deferred that fires once the handoff ticket's C{seconds} have passed; cancelled when this stops."""
        if not self.running:
            return defer.fail(defer.CancelledError())
        wait = task.deferLater(self._clock, seconds, lambda: None)
        self._handoff_waits.add(wait)
        return wait.addBoth(lambda result: (self._handoff_waits.discard(wait), result)[1])

    async def _renew_slices(self, count):
        """
        The timer's tick: renew the slice due now, and those of any ticks
        missed.  A slice that fails is logged and tried again at its next turn.
        """
        for _ in range(min(count, RENEWAL_SLICES)):
            self._ticks += 1
            try:
                await self._renew(list(self._slices[self._ticks % RENEWAL_SLICES].values()))
            except Exception:
                self._failures.failed("presence renewal: a slice failed")
        self._ticks += max(0, count - RENEWAL_SLICES)

    async def _renew(self, connections):
        """
        Renew these connections' sessions and presence, a thousand at a
        time; close those no longer live.  A user whose renewal failed is
        logged and left for their next turn.
        """
        for start in range(0, len(connections), 1000):
            chunk = connections[start:start + 1000]
            outcomes = await defer.DeferredList([self._presence.renew(c.user_id, c.jti, c.holder) for c in chunk],
                                                consumeErrors=True)
            for connection, (renewed, refused) in zip(chunk, outcomes):
                if not renewed:
                    self._failures.failed("presence renewal: cannot renew a user's presence", refused)
                elif refused is not None:
                    connection.kick(refused)
