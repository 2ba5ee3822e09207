"""
Players' presence renewals, driven by a task.Clock against a recording
presence, and against the real Redis Cluster for an error reply.
"""

import inspect
import random

import txredisapi
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.errors import ErrorCode
from dreamraid.services.livestore import profile_key, session_key
from dreamraid.services.players import RENEWAL_SLICES, IPlayerConnection, Players
from dreamraid.services.presence import Presence, handoff_key, presence_key
from tests import cluster
from tests.support import eventually, log_lines, require_stack, when_logged

TTL = 300.0


class RecordingPresence:
    """
    The part of L{Presence} Players uses; every session is live unless named
    in C{gone}.  Renewing a user in C{failing} fails with that error; one in
    C{broken} raises at once, as a bug would.
    """

    def __init__(self, clock):
        self.clock, self.renewed, self.gone = clock, [], set()
        self.failing, self.broken = {}, set()

    def listen(self, on_kick, on_notice):
        return self

    def stop(self):
        return defer.succeed(None)

    def enter_handoff(self, user_id, ticket):
        return defer.succeed(None)

    def renew(self, user_id, jti):
        if user_id in self.broken:
            raise TypeError("a bug")
        if user_id in self.failing:
            return defer.fail(self.failing[user_id])
        self.renewed.append((self.clock.seconds(), user_id))
        return defer.succeed(user_id not in self.gone)

    def leave(self, user_id, jti, wait_for_handoff=False):
        return defer.succeed(False)


@implementer(IPlayerConnection)
class FakeConnection:
    def __init__(self):
        self.user_id = self.jti = None
        self.kicked = []

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
        self.router = cluster.router()
        self.addCleanup(self.router.stopService)
        await self.router.refresh()
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
