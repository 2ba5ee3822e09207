"""
The players of one game server process: authentication with the
live-session check, one connection per user across every process (the
newest authentication wins, also with the same token), presence renewal,
players away after their connection dropped, and what happens when a
player leaves.

Each user here has one L{dreamraid.services.avatar.Player}: its identity,
the connection it plays through now (None while away) and its away state.
A connection that closes without a logout leaves its player away for
C{resume_grace} seconds: its session and presence are kept (this process
goes on renewing them), and so are its party, ticket and raid place, until
the player resumes (here or on any process) or the grace runs out and the
leave runs, once.
"""

import collections

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.avatar import LeaveRules, Player
from dreamraid.services.deferreds import gather
from dreamraid.services.failurelog import REDIS_ERRORS, FailureLog
from dreamraid.services.health import Unhealthy
from dreamraid.services.parties import AWAY, BACK
from dreamraid.services.presence import Left, holder_number, holder_server
from dreamraid.services.rediscluster import RedisClusterError


class IPlayerConnection(Interface):
    """What L{Players} needs of a client connection."""

    player = Attribute("the L{dreamraid.services.avatar.Player} it plays as, or None (set by authentication)")

    def kick(code):
        """Close the connection after telling the client C{code}."""

    def push(event, body):
        """Send the client C{event} (a name the protocol knows, such as C{"party_changed"}) with C{body}."""


# Each player's session and presence are renewed every third of the
# presence TTL, a hundredth of the players at a time: renewing them all at
# once held every request up behind thousands of Redis calls.
RENEWAL_SLICES = 100

# The notice (L{Presence.ask}) asking a raid's host to give a resumed player their place again.
PLACE_AGAIN = "raid_place_again"

# Pushes an away player is given when it resumes (here, or forwarded to
# the process it resumed on): a raid's result, which nothing else tells it
# (the resume reply says where it is now, and the raid is over by then).
KEPT_WHILE_AWAY = frozenset({"raid_result"})

# Seconds a notice for an authentication of this process that is not
# attached yet is kept for it: its enter script's reply is on its way.
EARLY_FOR = 10.0


def _described(error):
    """An unexpected error as one log line's worth: its class and message."""
    return f"{type(error).__name__}: {error}"


class Players(Service):
    """The players of this process, by user: connected, and away."""

    _log = Logger()

    def __init__(self, verifier, presence, queue, clock, presence_ttl, resume_grace=0.0, parties=None,
                 matchmaker=None):
        """
        @param resume_grace: seconds a player whose connection closed
            without a logout stays away (all kept) before it leaves the game.
        @param parties: the L{dreamraid.services.parties.Parties} a leaving
            player leaves (and tells of away and back); None: no parties.
        @param matchmaker: the L{dreamraid.services.matchmaking.Matchmaker}
            a leaving player's ticket is withdrawn from; None: no queue.
        """
        self._verifier = verifier
        self._presence = presence
        self._clock = clock
        self._presence_ttl = presence_ttl
        self._grace = resume_grace
        self._rules = LeaveRules(presence, queue, parties, matchmaker)
        self._players = {}  # user id -> Player
        self._slices = [{} for _ in range(RENEWAL_SLICES)]  # user id % RENEWAL_SLICES -> {user id: Player}
        self._ticks = 0
        self._renewals = None
        self._kicks = None
        self._failures = FailureLog(self._log, clock)
        self._departures = {}  # Player -> Deferreds of those waiting for its leave to end
        self._leave_games = {}  # Player -> the leave_game its leave was asked to run instead of the rules'
        self._leaving = set()  # Players whose session script is under way
        self._background = set()  # Deferreds of leaves and party notices under way
        self._place_again = None  # the raid host's, once it asked (when_asked_to_place)
        self._entering = collections.Counter()  # user id -> authentications of theirs under way here
        self._moved = {}  # user id -> when an away player of theirs here was taken over elsewhere (resumed)
        self._early = {}  # holder -> (when, user id, [(event, body)]): notices for it that came before it was attached

    def __len__(self):
        return len(self._players)

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
        return defer.ensureDeferred(self._stop())

    async def _stop(self):
        """
        Let every player go, away ones too (their data is synced), and
        close their connections, before Redis goes.  A player waiting for a
        raid handoff ticket ends nothing: its session expires by itself.
        """
        for player in [p for p in self._players.values() if p in self._departures and p not in self._leaving]:
            self._forget(player)
            self._departed(player, None)
        players = list(self._players.values())
        connections = [p.connection for p in players if p.connection is not None]
        await gather([self._depart(p, wait_for_handoff=False) for p in players])
        for connection in connections:
            connection.player = None
            connection.kick(ErrorCode.SHUTTING_DOWN)
        await gather(list(self._background))
        await self._kicks.stop()

    async def check_kicks(self):
        """For health: fail unless this process hears kicks from the others right now."""
        if self._kicks is None or not self._kicks.subscribed:
            raise Unhealthy("not subscribed to kicks from other game servers")

    def when_listening(self):
        """A Deferred that fires once this process hears kicks from the others."""
        return self._kicks.when_subscribed()

    # -- taking a user over ------------------------------------------------------------

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
        if not self.running:
            # Stopping: a player taken over now would be left with nobody to run its leave.
            raise RequestRefused(ErrorCode.SHUTTING_DOWN)
        self._entering[user_id] += 1
        entered = None
        try:
            entered = await enter(user_id, jti)
        except RedisClusterError as e:
            self._log.warn("authenticate user {user_id}: {error}", user_id=user_id, error=e)
            raise RequestRefused(ErrorCode.UNAVAILABLE) from None
        finally:
            self._entering[user_id] -= 1
            if not self._entering[user_id]:
                del self._entering[user_id]
                # No authentication of theirs is under way here now: notices kept for one that
                # failed (its reply never came, or it was refused) would wait for nobody.
                for holder in [h for h, (_, u, _) in self._early.items()
                               if u == user_id and (entered is None or h != entered.holder)]:
                    del self._early[holder]
        at, _, early = self._early.pop(entered.holder, (None, None, []))
        if at is not None and self._clock.seconds() - at > EARLY_FOR:
            early = []
        player = self._attach(connection, user_id, jti, entered)
        missed, player.missed = player.missed, []
        for event, body in missed + early:
            connection.push(event, body)
        return entered

    async def resume(self, connection, token, user_id=0, ticket=""):
        """
        Take the player over again after its connection dropped (it was
        away) or while an old connection of theirs is still half open: the
        credential is the live session, the login C{token}'s id or, after a
        raid handoff, the handoff C{ticket} of C{user_id}.  Everything the
        player had (session, party, ticket, raid place) is theirs again; if
        it was away, its party is told it is back.  An L{Entered}.

        @raise RequestRefused: C{RESUME_EXPIRED} if the credential is not
            the live session (the grace ran out and the leave ran, or the
            user logged out or entered the world again); a bad token; Redis down.
        """
        if ticket:
            credential = ticket
        else:
            # An expired token still names its session: the live-session check below is the credential, as
            # for the connection that dropped, which played on past its token's expiry.
            claims = self._verifier.verify(token, allow_expired=True)
            user_id, credential = claims.user_id, claims.jti
        try:
            entered = await self._take_over(connection, user_id, credential, self._presence.enter)
        except RequestRefused as e:
            if e.code == ErrorCode.SESSION_NOT_LIVE:
                raise RequestRefused(ErrorCode.RESUME_EXPIRED) from None
            raise
        self._log.info("user {user_id}: resumed{away}", user_id=user_id, away=" (was away)" if entered.was_away else "")
        if entered.was_away:
            self._in_background(self._rules.tell_party(user_id, BACK))
        return entered

    def _attach(self, connection, user_id, jti, entered):
        """The user is C{connection}'s now, with the presence C{entered} took: the older connection is closed."""
        player = self._players.get(user_id)
        if player is not None and holder_number(player.holder) > holder_number(entered.holder):
            # A later authentication here was attached first: this one is already replaced.
            raise RequestRefused(ErrorCode.LOGGED_IN_ELSEWHERE)
        if player is None:
            player = Player(user_id, entered.name, jti, entered.holder, connection, self._clock, self._grace_over)
            self._players[user_id] = self._slices[user_id % RENEWAL_SLICES][user_id] = player
            older = None
        else:
            older = player.connection
            player.attach(connection, jti, entered.holder)
            player.name = entered.name
            self._departed(player, Left.REPLACED)  # a leave waiting for a handoff ticket finds it replaced
        connection.player = player
        if older is not None and older is not connection:
            older.kick(ErrorCode.LOGGED_IN_ELSEWHERE)
        return player

    def connection_of(self, user_id):
        """The user's connection to this process, or None (none here, or away)."""
        player = self._players.get(user_id)
        return None if player is None else player.connection

    def player_of(self, user_id):
        """The user's L{Player} on this process (connected or away), or None."""
        return self._players.get(user_id)

    def taken_over(self, user_id, holder):
        """Another process took C{user_id} over from the authentication C{holder}: let the player go here."""
        player = self._players.get(user_id)
        if player is not None and player.holder == holder:
            connection = player.connection
            self._forget(player)
            self._departed(player, Left.REPLACED)
            if connection is not None:
                connection.kick(ErrorCode.LOGGED_IN_ELSEWHERE)
            else:
                self._log.info("user {user_id}: away here, taken over elsewhere (resumed); nothing ends here",
                               user_id=user_id)
                now = self._clock.seconds()
                for stale in [u for u, at in self._moved.items() if now - at > EARLY_FOR]:
                    del self._moved[stale]
                self._moved[user_id] = now
            for event, body in player.missed:
                self._in_background(self._forward(user_id, event, body))
            player.missed = []

    async def _forward(self, user_id, event, body):
        """Push C{event}, kept while the player was away here, to wherever it resumed; a failure is logged."""
        try:
            await self._presence.tell([user_id], event, body)
        except REDIS_ERRORS as e:
            self._log.warn("user {user_id} resumed elsewhere, but its {event} kept here was lost: {error}",
                           user_id=user_id, event=event, error=e)

    def when_asked_to_place(self, place_again):
        """
        Call C{place_again(user_id, raid_id)} when another process asks this
        one (the raid's host) to give a resumed player their raid place again.
        """
        self._place_again = place_again

    def notified(self, user_ids, event, body, holder=None):
        """
        Another process (or this one) told users of this one C{event}: push
        it to those still here.  A notice for one authentication (C{holder})
        goes to it only: not to a player resumed since, nor away.  One for
        an authentication of this process not attached yet (its enter script
        ran, its reply is on its way) waits for it (L{_take_over}), a while.
        An away player's raid result (L{KEPT_WHILE_AWAY}) is kept for its
        resume: pushed once it resumes here, forwarded if elsewhere, also
        when it comes (a while, EARLY_FOR) after the takeover that let the
        player go here: the teller read the presence before the resume.
        """
        if event == PLACE_AGAIN:
            if self._place_again is not None:
                self._place_again(body["user_id"], body["raid_id"], body.get("holder"))
            return
        for user_id in user_ids:
            player = self._players.get(user_id)
            if player is None and event in KEPT_WHILE_AWAY and user_id not in self._entering and \
                    self._clock.seconds() - self._moved.get(user_id, -EARLY_FOR - 1) <= EARLY_FOR:
                # Told (read as away here) just as a resume elsewhere took the player over: follow it.
                self._in_background(self._forward(user_id, event, body))
                continue
            if holder is not None and (player is None or player.holder != holder):
                if holder_server(holder) == self._presence.server_id and user_id in self._entering:
                    self._early_notice(holder, user_id, event, body)
                continue
            if player is not None and player.connection is not None:
                player.connection.push(event, body)
            elif player is not None and player.away and event in KEPT_WHILE_AWAY:
                player.missed.append((event, body))

    def _early_notice(self, holder, user_id, event, body):
        """
        Keep a notice for the authentication C{holder} of C{user_id}, not
        attached yet; those kept over EARLY_FOR go.
        """
        now = self._clock.seconds()
        for stale in [h for h, (at, _, _) in self._early.items() if now - at > EARLY_FOR]:
            del self._early[stale]
        self._early.setdefault(holder, (now, user_id, []))[2].append((event, body))

    def _forget(self, player):
        """The player is no longer this process's: no renewal, no timer."""
        if self._players.get(player.user_id) is player:
            del self._players[player.user_id]
            del self._slices[player.user_id % RENEWAL_SLICES][player.user_id]
        player.gone()

    # -- leaving ---------------------------------------------------------------------

    def _current(self, connection):
        """The player C{connection} plays as, if it is still that player's connection here; else None (logged)."""
        player = connection.player
        if player is None:
            return None
        if player.connection is connection and self._players.get(player.user_id) is player:
            return player
        self._log.info("user {user_id}: a replaced connection closed (a newer connection or a raid's host has "
                       "the player); nothing ended, the party and any ticket stay", user_id=player.user_id)
        return None

    def connection_lost(self, connection):
        """
        The connection closed without a logout.  If it is still its
        player's, the player is away for C{resume_grace} (the party is
        told), then leaves unless it resumed; with no grace it leaves at
        once.  A Deferred (or None) of what the leave found, if it ran now.
        """
        player = self._current(connection)
        if player is None or player in self._departures:
            return None  # replaced, or its leave is under way already
        if self._grace > 0 and self.running:
            player.went_away(self._grace)
            self._log.info("user {user_id}: connection lost; away for {grace} s", user_id=player.user_id,
                           grace=self._grace)
            self._in_background(self._gone_away(player))
            return None
        return defer.ensureDeferred(self.leave(connection))

    async def _gone_away(self, player):
        """
        Mark the player away in its presence, and then tell its party; a
        failure is logged.  A presence another authentication took already
        (a resume elsewhere won the race) is not marked, and nobody hears
        "away": the resume saw no mark and sends no "back".
        """
        if await self._mark_away(player, self._grace):
            await self._rules.tell_party(player.user_id, AWAY)

    async def _mark_away(self, player, seconds):
        """
        Mark the player away for the C{seconds} it waits, plus the presence
        TTL: the mark outlives the wait (the grace, or a handoff ticket's
        time after it) and whatever runs at its end, and lapses with the
        presence if this process dies; the leave takes it off.  Whether it
        was marked (a failure is logged).
        """
        try:
            return await self._presence.mark_away(player.user_id, player.holder, seconds + self._presence_ttl)
        except REDIS_ERRORS as e:
            self._log.warn("user {user_id} is away, but not marked so: {error}", user_id=player.user_id, error=e)
            return False

    def _grace_over(self, player):
        self._log.info("user {user_id}: away past the resume grace; leaving the game", user_id=player.user_id)
        self._in_background(self._depart(player, wait_for_handoff=True))

    def _in_background(self, work):
        d = defer.ensureDeferred(work)
        d.addErrback(lambda f: self._log.failure("a player's leave or notice failed", f))
        self._background.add(d)
        d.addBoth(lambda _: self._background.discard(d))

    async def leave(self, connection, leave_game=None, wait_for_handoff=True):
        """
        The connection logged out or its player leaves the game now.  If a
        newer authentication of the user (here or on another process, with
        any token, a raid handoff among them) replaced it, nothing ends: the
        player goes on there.  Otherwise end its session if it is still the
        live one, run the leave rules (C{leave_game(user_id)}, an async
        callable, instead of leaving the party and queue, if given; also
        when Redis did not answer, as the player is most likely gone), then
        have the user's data written back.  What the leave found, a
        L{dreamraid.services.presence.Left}, or None if Redis did not answer
        or this service stopped while it waited.

        With C{wait_for_handoff} (a connection that closed, not a logout),
        one whose player has a raid handoff ticket waiting ends nothing yet:
        the player is away while it moves to the raid's host (the old
        connection may close before the new one arrives there), until the
        ticket is used (the leave then finds the player replaced) or
        expires; then the session is ended only if still this player's.
        """
        player = self._current(connection)
        if player is None:
            return Left.REPLACED
        return await self._depart(player, wait_for_handoff, leave_game)

    def _depart(self, player, wait_for_handoff, leave_game=None):
        """
        A Deferred of the player's leave, once it ended (or found the
        player resumed or taken over).  A leave already under way, or
        waiting for a handoff ticket, is joined, not run twice.
        """
        waiting = defer.Deferred()
        self._departures.setdefault(player, []).append(waiting)
        if leave_game is not None:
            self._leave_games[player] = leave_game
        if player not in self._leaving:
            self._in_background(self._try_leave(player, wait_for_handoff))
        return waiting

    def _departed(self, player, left):
        """The player's leave is over (or moot): tell whoever waits for it."""
        self._leave_games.pop(player, None)
        for waiting in self._departures.pop(player, []):
            waiting.callback(left)

    async def _try_leave(self, player, wait_for_handoff):
        """
        End the player's session unless replaced, then the rest of the
        leave; if a raid handoff ticket waits, the player stays away until
        the ticket's time is up and this runs again.
        """
        user_id, holder = player.user_id, player.holder
        self._leaving.add(player)
        try:
            left = await self._rules.end_session(player, wait_for_handoff and self.running)
        except REDIS_ERRORS as e:
            # The session expires by itself and the next checkpoint syncs the user.
            self._log.warn("user {user_id} left, but Redis did not hear it: {error}", user_id=user_id, error=e)
            left = None
        except Exception as e:
            # A bug, not Redis: taken as a script Redis did not answer, so the leave ends and nobody waits forever.
            self._log.error("user {user_id}: the leave failed in its session script ({error}); taken as unanswered: "
                            "the session expires by itself", user_id=user_id, error=_described(e))
            left = None
        finally:
            self._leaving.discard(player)
        if player.holder != holder or player not in self._departures:
            # Resumed here or taken over meanwhile (the script found the player replaced, or came first and the
            # resume was refused): whoever holds the player now decides.
            self._departed(player, Left.REPLACED)
            return
        if isinstance(left, float) and not self.running:
            # Stopping meanwhile: nobody will be here when the ticket's time is up; the session expires by itself.
            self._forget(player)
            self._departed(player, None)
            return
        if isinstance(left, float):  # the seconds a handoff ticket still waits: the departure stays open
            self._log.info("user {user_id}: a connection closed while a raid handoff ticket waits; the "
                           "session waits {seconds:.1f} s for the player to move", user_id=user_id, seconds=left)
            if player.away:
                player.wait_more(left)
            else:
                player.went_away(left)
            if self._grace > 0:
                # Away longer than the grace: the mark is kept as long (with no grace nobody was told "away").
                self._in_background(self._mark_away(player, left))
            return
        leave_game = self._leave_games.get(player)
        self._forget(player)
        try:
            if left is Left.REPLACED:
                self._log.info("user {user_id}: a replaced connection closed (a newer connection or a raid's host "
                               "has the player); nothing ended, the party and any ticket stay", user_id=user_id)
            else:
                await self._rules.after_session(user_id, left, leave_game)
        except Exception as e:
            self._log.error("user {user_id}: the leave failed after its session script ({error}); the player is let "
                            "go here, and its party or ticket may stay", user_id=user_id, error=_described(e))
        finally:
            self._departed(player, left)

    # -- renewal ------------------------------------------------------------------------

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

    async def _renew(self, players):
        """
        Renew these players' sessions and presence (away ones too), a
        thousand at a time.  A player another authentication took over is
        let go (its connection closed); one whose session is no longer live
        leaves (its connection closed).  A user whose renewal failed is
        logged and left for their next turn.
        """
        for start in range(0, len(players), 1000):
            chunk = players[start:start + 1000]
            outcomes = await defer.DeferredList([self._presence.renew(p.user_id, p.jti, p.holder) for p in chunk],
                                                consumeErrors=True)
            for player, (renewed, refused) in zip(chunk, outcomes):
                if not renewed:
                    self._failures.failed("presence renewal: cannot renew a user's presence", refused)
                elif refused is ErrorCode.LOGGED_IN_ELSEWHERE:
                    self.taken_over(player.user_id, player.holder)
                elif refused is not None and self._players.get(player.user_id) is player:
                    connection = player.connection
                    self._in_background(self._depart(player, wait_for_handoff=False))
                    if connection is not None:
                        connection.kick(refused)
