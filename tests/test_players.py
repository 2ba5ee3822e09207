"""
Players' presence renewals, driven by a task.Clock against a recording
presence, and against the real Redis Cluster for an error reply; and the
newest authentication of a user winning, with the same token, on one
process or two, against the real Redis Cluster.
"""

import inspect
import random

import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.services.livestore import profile_key, session_key
from dreamraid.services.players import RENEWAL_SLICES, IPlayerConnection, Players
from dreamraid.services.rediscluster import ClusterUnavailable
from dreamraid.services.tokens import Claims, ITokenVerifier
from dreamraid.services.presence import Entered, Left, Presence, handoff_key, presence_key
from tests import cluster
from tests.support import eventually, log_lines, require_stack, when_logged

TTL = 300.0


class RecordingPresence:
    """
    The part of L{Presence} Players uses; every session is live unless named
    in C{gone}, and held by its connection unless named in C{replaced}.
    Renewing a user in C{failing} fails with that error; one in C{broken}
    raises at once, as a bug would.
    """

    def __init__(self, clock):
        self.clock, self.renewed, self.gone, self.replaced = clock, [], set(), set()
        self.failing, self.broken = {}, set()

    def listen(self, on_kick, on_notice):
        return self

    def stop(self):
        return defer.succeed(None)

    def enter_handoff(self, user_id, ticket):
        return defer.succeed(Entered(user_id, "n", 1, 0, f"test {user_id}"))

    def renew(self, user_id, jti, holder):
        if user_id in self.broken:
            raise TypeError("a bug")
        if user_id in self.failing:
            return defer.fail(self.failing[user_id])
        self.renewed.append((self.clock.seconds(), user_id))
        if user_id in self.replaced:
            return defer.succeed(ErrorCode.LOGGED_IN_ELSEWHERE)
        return defer.succeed(ErrorCode.SESSION_NOT_LIVE if user_id in self.gone else None)

    def leave(self, user_id, jti, holder, wait_for_handoff=False):
        return defer.succeed(Left.NOT_LIVE)


@implementer(IPlayerConnection)
class FakeConnection:
    def __init__(self):
        self._player = self.holder = None
        self.kicked = []

    @property
    def player(self):
        return self._player

    @player.setter
    def player(self, player):
        """Players sets it at authentication: the holder is the authentication's, kept as it was then."""
        self._player = player
        if player is not None:
            self.holder = player.holder

    def kick(self, code):
        self.kicked.append(code)

    def push(self, event, body):
        pass


class RenewalTests(TestCase):

    def setUp(self):
        self.clock = Clock()
        self.presence = RecordingPresence(self.clock)
        self.players = Players(None, self.presence, None, self.clock, TTL)
        self.players.startService()
        self.addCleanup(self.players.stopService)

    def test_fakes_match_the_real_interfaces(self):
        verifyObject(IPlayerConnection, FakeConnection())
        verifyObject(ITokenVerifier, FakeVerifier())
        for name in ("listen", "enter_handoff", "renew", "leave"):
            self.assertEqual(inspect.signature(getattr(RecordingPresence, name)),
                             inspect.signature(getattr(Presence, name)), name)

    def join(self, user_ids):
        connections = {}
        for user_id in user_ids:
            connections[user_id] = FakeConnection()
            self.successResultOf(defer.ensureDeferred(
                self.players.authenticate_handoff(connections[user_id], user_id, f"jti{user_id}")))
        return connections

    def test_a_later_authentication_registered_first_wins(self):
        """
        Two authentications of one user on this process whose Redis answers
        are handled out of order (the earlier one's last): the later one
        (the larger holder) keeps the user and is not kicked; the earlier is
        refused with C{LOGGED_IN_ELSEWHERE} and never registered.
        """
        answers = {}

        def enter_handoff(user_id, ticket):
            answers[ticket] = defer.Deferred()
            return answers[ticket]

        self.presence.enter_handoff = enter_handoff
        earlier, later = FakeConnection(), FakeConnection()
        first = defer.ensureDeferred(self.players.authenticate_handoff(earlier, 7, "a"))
        second = defer.ensureDeferred(self.players.authenticate_handoff(later, 7, "b"))
        answers["b"].callback(Entered(7, "n", 1, 0, "test 2"))
        answers["a"].callback(Entered(7, "n", 1, 0, "test 1"))
        self.assertEqual(self.successResultOf(second).holder, "test 2")
        self.assertEqual(self.failureResultOf(first).value.code, ErrorCode.LOGGED_IN_ELSEWHERE)
        self.assertIs(self.players.connection_of(7), later)
        self.assertEqual(later.kicked, [])

    def test_every_player_renewed_each_third_of_the_ttl_a_slice_at_a_time(self):
        """Within each third of the TTL every player is renewed once, and no tick renews more than a slice."""
        self.join(range(100))
        step = TTL / 3 / RENEWAL_SLICES
        for _ in range(RENEWAL_SLICES * 2):
            self.clock.advance(step)
        times = sorted({t for t, _ in self.presence.renewed})
        self.assertEqual(len(times), RENEWAL_SLICES * 2)
        per_tick = [sum(1 for t, _ in self.presence.renewed if t == tick) for tick in times]
        self.assertEqual(per_tick, [100 // RENEWAL_SLICES] * (RENEWAL_SLICES * 2))
        first_third = [u for t, u in self.presence.renewed if t <= TTL / 3 + 1e-9]
        self.assertEqual(sorted(first_third), list(range(100)))

    def test_a_late_clock_renews_every_slice_it_missed(self):
        """A tick that comes a whole third late still renews everyone."""
        self.join(range(30))
        self.clock.advance(TTL / 3)
        self.assertEqual(sorted(u for _, u in self.presence.renewed), list(range(30)))

    def test_a_session_no_longer_live_is_closed(self):
        connections = self.join([1, 2])
        self.presence.gone.add(2)
        self.clock.advance(TTL / 3)
        self.assertEqual((connections[1].kicked, connections[2].kicked), ([], [ErrorCode.SESSION_NOT_LIVE]))

    def test_a_kick_from_another_process_closes_only_the_authentication_it_names(self):
        """
        A kick names the authentication another process replaced: a
        connection here that authenticated since (a newer one) stays.
        """
        connection = self.join([1])[1]
        self.players.taken_over(1, "another-server 7")
        self.assertEqual(connection.kicked, [])
        self.players.taken_over(1, connection.holder)
        self.assertEqual(connection.kicked, [ErrorCode.LOGGED_IN_ELSEWHERE])

    def test_a_replaced_connection_is_closed_at_renewal(self):
        """A renewal that finds a newer authentication holding the user closes the connection with LOGGED_IN_ELSEWHERE."""
        connections = self.join([1, 2])
        self.presence.replaced.add(2)
        self.clock.advance(TTL / 3)
        self.assertEqual((connections[1].kicked, connections[2].kicked), ([], [ErrorCode.LOGGED_IN_ELSEWHERE]))

    def test_a_player_who_left_is_not_renewed(self):
        connections = self.join([1, 2])
        self.successResultOf(defer.ensureDeferred(self.players.leave(connections[2])))
        self.clock.advance(TTL / 3)
        self.assertEqual([u for _, u in self.presence.renewed], [1])

    def test_a_failed_renewal_spares_the_others_and_the_next_rounds(self):
        """An error reply for one user is logged once; the rest of its slice is renewed, and the user next round."""
        lines = log_lines(self)
        connections = self.join([1, 101, 201, 2])  # 1, 101 and 201 share a slice
        self.presence.failing[1] = txredisapi.ResponseError("WRONGTYPE Operation against a key")
        self.presence.gone.add(201)
        self.clock.advance(TTL / 3)
        self.assertEqual(sorted(u for _, u in self.presence.renewed), [2, 101, 201])
        self.assertEqual(connections[201].kicked, [ErrorCode.SESSION_NOT_LIVE])
        self.assertEqual(lines, ["presence renewal: cannot renew a user's presence: WRONGTYPE Operation against a key"])
        del self.presence.failing[1]
        self.clock.advance(TTL / 3)
        self.assertIn(1, [u for t, u in self.presence.renewed if t > TTL / 3])

    def test_a_bug_in_one_slice_is_logged_and_renewal_goes_on(self):
        """An unexpected error is logged with its traceback; the other slices and the next round are renewed."""
        self.join([1, 2])
        self.presence.broken.add(1)
        self.clock.advance(TTL / 3)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)
        self.presence.broken.clear()
        self.clock.advance(TTL / 3)
        self.assertEqual([u for _, u in self.presence.renewed], [2, 1, 2])


class RenewalAgainstRedisTests(TestCase):
    """Renewal through the real router, with the timer on a task.Clock."""

    timeout = 60

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)
        self.clock = Clock()
        self.presence = Presence(self.router, f"test-renewal-{random.getrandbits(40):x}", TTL, 900)
        self.players = Players(None, self.presence, None, self.clock, TTL)
        self.players.startService()
        self.addCleanup(self.players.stopService)

    async def join(self, user_id):
        """A connection that entered with a handoff ticket, as after a raid; its keys go after the test."""
        keys = [session_key(user_id), presence_key(user_id), profile_key(user_id), handoff_key(user_id)]
        self.addCleanup(lambda: self.router.execute("DEL", *keys))  # before the players stop: nobody is live
        await self.router.execute("SET", session_key(user_id), "at login")
        await self.router.execute("HSET", profile_key(user_id), "name", "n", "level", 1, "exp", 0)
        await self.presence.offer_handoff(user_id, f"ticket{user_id}", 30)
        connection = FakeConnection()
        await self.players.authenticate_handoff(connection, user_id, f"ticket{user_id}")
        return connection

    async def test_an_error_reply_from_redis_does_not_stop_renewal(self):
        """
        A session key of the wrong type makes Redis answer WRONGTYPE: that is
        logged, the others of the slice are renewed or closed, and once the key
        is right again the next round renews that user too.
        """
        base = random.randrange(10**13, 10**14) * 100
        broken, stale, fine = base + 7, base + 107, base + 207  # one slice
        connections = {user_id: await self.join(user_id) for user_id in (broken, stale, fine)}
        await self.router.execute("DEL", session_key(broken), presence_key(broken))
        await self.router.execute("DEL", presence_key(fine))
        await self.router.execute("HSET", session_key(broken), "not", "a string")
        await self.router.execute("SET", session_key(stale), "a newer login")
        logged = when_logged(self, "WRONGTYPE")
        self.clock.advance(TTL / 3)
        self.assertIn("presence renewal: cannot renew a user's presence: WRONGTYPE", await logged)
        await eventually(lambda: self.router.execute("EXISTS", presence_key(fine)))
        await eventually(lambda: defer.succeed(connections[stale].kicked))
        self.assertEqual(connections[stale].kicked, [ErrorCode.SESSION_NOT_LIVE])
        await self.router.execute("DEL", session_key(broken))
        await self.router.execute("SET", session_key(broken), f"ticket{broken}")
        self.clock.advance(TTL / 3)
        await eventually(lambda: self.router.execute("EXISTS", presence_key(broken)))
        self.assertEqual(connections[broken].kicked, [])


@implementer(ITokenVerifier)
class FakeVerifier:
    """Takes C{"<user id>:<jti>"} for a token with those claims; every token has expired once C{expired} is set."""

    expired = False

    def verify(self, token, allow_expired=False):
        if self.expired and not allow_expired:
            raise RequestRefused(ErrorCode.TOKEN_EXPIRED)
        user_id, jti = token.split(":")
        return Claims(int(user_id), jti, 0, 0)


class RecordingQueue:
    """Keeps the sync jobs asked for."""

    def __init__(self):
        self.jobs = []

    def enqueue(self, user_id, reason):
        self.jobs.append((user_id, reason))
        return defer.succeed(None)


class NewestAuthenticationTests(TestCase):
    """
    Two game server processes' players (two Presences on the real Redis
    Cluster, timers on a task.Clock): the newest authentication of a user
    holds them, also with the same token, and a replaced connection's leave
    or renewal changes nothing of the newer one's.
    """

    timeout = 60

    async def setUp(self):
        require_stack()
        self.router = await cluster.router_for(self)
        self.clock = Clock()
        self.queue = RecordingQueue()
        self.processes = []
        for name in ("a", "b"):
            presence = Presence(self.router, f"test-newest-{name}-{random.getrandbits(40):x}", TTL, 900)
            players = Players(FakeVerifier(), presence, self.queue, self.clock, TTL)
            players.startService()
            self.addCleanup(players.stopService)
            await players.when_listening()
            self.processes.append(players)
        self.user_id = random.randrange(10**13, 10**14)
        keys = [session_key(self.user_id), presence_key(self.user_id), profile_key(self.user_id)]
        self.addCleanup(lambda: self.router.execute("DEL", *keys))
        await self.router.execute("SET", session_key(self.user_id), "jti1")
        await self.router.execute("HSET", profile_key(self.user_id), "name", "n", "level", 1, "exp", 0)
        self.left_game = []

    async def authenticated(self, players):
        connection = FakeConnection()
        await players.authenticate(connection, f"{self.user_id}:jti1")
        return connection

    async def test_a_logout_spends_the_handoff_ticket(self):
        """
        A raid offered a handoff ticket, then the player logged out: the
        ticket dies with the session, so it cannot take over the session of
        the player's next login.
        """
        presence = Presence(self.router, f"test-spent-{random.getrandbits(40):x}", TTL, 900)
        self.addCleanup(lambda: self.router.execute("DEL", handoff_key(self.user_id)))
        holder = (await presence.enter(self.user_id, "jti1")).holder
        await presence.offer_handoff(self.user_id, "to the host", 30)
        self.assertIs(await presence.leave(self.user_id, "jti1", holder), Left.ENDED)
        await self.router.execute("SET", session_key(self.user_id), "the next login")
        with self.assertRaises(RequestRefused) as refused:
            await presence.enter_handoff(self.user_id, "to the host")
        self.assertEqual(refused.exception.code, ErrorCode.HANDOFF_REFUSED)
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"the next login")

    async def leave(self, players, connection):
        async def leave_game(user_id):
            self.left_game.append(user_id)

        return await players.leave(connection, leave_game)

    async def renew(self):
        """Run a round of renewals and wait until it has renewed the user's presence."""
        await self.router.execute("PEXPIRE", presence_key(self.user_id), int(1000 * TTL // 3))
        self.clock.advance(TTL / 3)

        async def renewed():
            return await self.router.execute("PTTL", presence_key(self.user_id)) > 1000 * TTL // 2

        await eventually(renewed)

    async def assertHeldBy(self, connection):
        """The session is still the token's and the presence the connection's."""
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"jti1")
        self.assertEqual(await self.router.execute("GET", presence_key(self.user_id)), connection.holder.encode())

    async def test_same_token_on_one_process(self):
        """
        The older connection is closed; its leave finds it replaced and ends
        nothing (the player stays in their party, no sync); renewals keep
        the newer one, whose own leave then ends the session.
        """
        here = self.processes[0]
        older = await self.authenticated(here)
        newer = await self.authenticated(here)
        self.assertEqual((older.kicked, newer.kicked), ([ErrorCode.LOGGED_IN_ELSEWHERE], []))
        self.assertNotEqual(older.holder, newer.holder)
        self.assertIs(await self.leave(here, older), Left.REPLACED)
        self.assertEqual((self.left_game, self.queue.jobs), ([], []))
        await self.assertHeldBy(newer)
        await self.renew()
        await self.assertHeldBy(newer)
        self.assertEqual(newer.kicked, [])
        self.assertIs(await self.leave(here, newer), Left.ENDED)
        self.assertEqual((self.left_game, self.queue.jobs), ([self.user_id], [(self.user_id, "logout")]))
        self.assertIsNone(await self.router.execute("GET", session_key(self.user_id)))

    async def test_same_token_on_another_process(self):
        """
        The older process is told and closes its connection, whose leave
        ends nothing; the newer process's renewals keep the user.
        """
        first, second = self.processes
        older = await self.authenticated(first)
        newer = await self.authenticated(second)
        await eventually(lambda: defer.succeed(older.kicked))
        self.assertEqual((older.kicked, newer.kicked), ([ErrorCode.LOGGED_IN_ELSEWHERE], []))
        self.assertIs(await self.leave(first, older), Left.REPLACED)
        self.assertEqual((self.left_game, self.queue.jobs), ([], []))
        await self.renew()
        await self.assertHeldBy(newer)
        self.assertEqual(newer.kicked, [])

    async def test_a_lost_kick_is_made_good_by_the_renewal(self):
        """
        A connection whose kick never came (pub/sub lost it) is closed by
        its next renewal, which leaves the newer holder's presence alone.
        """
        first, _ = self.processes
        older = await self.authenticated(first)
        await self.router.execute("SET", presence_key(self.user_id), "a-process-whose-kick-was-lost 1")
        self.clock.advance(TTL / 3)
        await eventually(lambda: defer.succeed(older.kicked))
        self.assertEqual(older.kicked, [ErrorCode.LOGGED_IN_ELSEWHERE])
        self.assertEqual(await self.router.execute("GET", presence_key(self.user_id)),
                         b"a-process-whose-kick-was-lost 1")
        self.assertEqual(await self.router.execute("GET", session_key(self.user_id)), b"jti1")


class UnreachableKickTests(TestCase):
    """The kick to the process a user moved from is told without waiting, and its loss fails nothing."""

    def test_a_kick_that_cannot_be_sent_still_enters(self):
        """The enter script took the user over; a publish that fails is logged, and the user has entered."""

        class Router:
            """Answers the enter script as Redis would for a user held on another process; publishing fails."""

            def execute(self, command, *args, timeout=None, route=None):
                return defer.succeed([1, b"other-server 3", b"ann", b"4", b"15"])

            def publish(self, channel, message, timeout=None):
                return defer.fail(ClusterUnavailable("the channel's master is down"))

        lines = log_lines(self)
        entered = self.successResultOf(defer.ensureDeferred(Presence(Router(), "here", 30, 900).enter(5, "jti")))
        self.assertEqual((entered.user_id, entered.name, entered.level, entered.holder), (5, "ann", 4, "here 1"))
        self.assertTrue(any("user 5: cannot tell other-server 3 to let go" in line for line in lines), lines)
