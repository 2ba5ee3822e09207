"""
One player of a game server process, apart from any connection: the avatar
a connection plays through once it authenticated (as C{twisted.words}'
C{IRCUser} gets one from the portal), and the rules of leaving the game.

A L{Player} holds who the player is (user id, name, the credential its live
session is and its authentication's presence holder), the connection it
plays through now (None while away), and whether it is playing or away:

    playing --connection lost--> away (resume_grace on the clock)
    away --resumed on this process--> playing
    away --grace over--> on_grace_over(player)     (once; the host leaves it)
    away --a handoff ticket still waits--> away (the ticket's time more)
    playing, away --logout, taken over, grace over and left--> gone

A player is taken over (a resume or login on another process, a raid
handoff) through the presence holder: the process that held it hears a
kick, or its renewal finds the holder replaced, and the player is gone
from there without leaving the game.  Time comes from the injected clock;
the one way out is C{on_grace_over}, which the owner (L{Players}) turns
into the leave.  L{LeaveRules} is that leave: end the session unless a newer
authentication holds the user, leave the party, withdraw the ticket, queue
the sync.
"""

import enum

from twisted.logger import Logger

from dreamraid.services.failurelog import REDIS_ERRORS
from dreamraid.services.presence import Left


class Stage(enum.Enum):
    PLAYING = "playing"
    AWAY = "away"
    GONE = "gone"


class Player:
    """One authenticated player of this process; see the module's docstring."""

    def __init__(self, user_id, name, jti, holder, connection, clock, on_grace_over):
        self.user_id = user_id
        self.name = name
        self.jti = jti  # the live session this player renews and leaves with: a token id or a handoff ticket
        self.holder = holder  # its authentication's presence value
        self.connection = connection
        self.stage = Stage.PLAYING
        self._clock = clock
        self._on_grace_over = on_grace_over
        self._timer = None
        self.away_since = None
        self.missed = []  # (event, body) of pushes kept while away, for its resume (Players.KEPT_WHILE_AWAY)

    def __repr__(self):
        return f"<Player {self.user_id} {self.stage.value}>"

    @property
    def away(self):
        return self.stage is Stage.AWAY

    def attach(self, connection, jti, holder):
        """A connection authenticated (or resumed) as this player here: it plays through it now."""
        self._cancel()
        self.connection, self.jti, self.holder = connection, jti, holder
        self.stage = Stage.PLAYING
        self.away_since = None

    def went_away(self, grace):
        """Its connection closed without a logout: away for C{grace} seconds."""
        self._cancel()
        self.connection = None
        self.stage = Stage.AWAY
        self.away_since = self._clock.seconds()
        self._timer = self._clock.callLater(grace, self._grace_over)

    def wait_more(self, seconds):
        """Still away: the grace is over, but it must wait C{seconds} more (a raid handoff ticket waits)."""
        if self.stage is Stage.AWAY:
            self._cancel()
            self._timer = self._clock.callLater(seconds, self._grace_over)

    def gone(self):
        """It left the game, or another authentication took it over: no timer runs any more."""
        self._cancel()
        self.connection = None
        self.stage = Stage.GONE

    def _cancel(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _grace_over(self):
        self._timer = None
        if self.stage is Stage.AWAY:
            self._on_grace_over(self)


class LeaveRules:
    """
    What leaving the game does: end the session (one presence script,
    which ends nothing if a newer authentication holds the user), then leave
    the party and withdraw the ticket, then queue the user's sync.
    """

    _log = Logger()

    def __init__(self, presence, queue, parties=None, matchmaker=None):
        self._presence = presence
        self._queue = queue
        self._parties = parties
        self._matchmaker = matchmaker

    def end_session(self, player, wait_for_handoff):
        """
        The presence script: a Deferred of a L{Left}, or of the seconds a
        raid handoff ticket of the player still waits (C{wait_for_handoff}).
        """
        return self._presence.leave(player.user_id, player.jti, player.holder, wait_for_handoff)

    async def leave_game(self, user_id):
        """The player left: their party and waiting ticket go too (a formed raid keeps them)."""
        if self._parties is None:
            return
        party = await self._parties.leave_if_any(user_id)
        if self._matchmaker is not None:
            await self._matchmaker.withdraw([user_id], party)

    async def after_session(self, user_id, left, leave_game=None):
        """The session script answered C{left} (or None: Redis did not): the rest of the leave."""
        if left is Left.REPLACED:
            return
        await (leave_game or self.leave_game)(user_id)
        if left is Left.ENDED:
            try:
                await self._queue.enqueue(user_id, "logout")
            except REDIS_ERRORS as e:
                self._log.warn("user {user_id} left, but their sync was not queued: {error}", user_id=user_id, error=e)

    async def tell_party(self, user_id, reason):
        """Tell the player's party members C{reason} (away, back) about them; a failure is logged."""
        if self._parties is None:
            return
        try:
            await self._parties.tell_status(user_id, reason)
        except REDIS_ERRORS as e:
            self._log.warn("user {user_id} is {reason}, but the party was not told: {error}", user_id=user_id,
                           reason=reason, error=e)
