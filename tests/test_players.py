"""Players' presence renewals, driven by a task.Clock against a recording presence."""

import inspect

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.errors import ErrorCode
from dreamraid.services.players import RENEWAL_SLICES, IPlayerConnection, Players
from dreamraid.services.presence import Presence

TTL = 300.0


class RecordingPresence:
    """The part of L{Presence} Players uses; every session is live unless named in C{gone}."""

    def __init__(self, clock):
        self.clock, self.renewed, self.gone = clock, [], set()

    def listen(self, on_kick, on_notice):
        return self

    def stop(self):
        return defer.succeed(None)

    def enter_handoff(self, user_id, ticket):
        return defer.succeed(None)

    def renew(self, user_id, jti):
        self.renewed.append((self.clock.seconds(), user_id))
        return defer.succeed(user_id not in self.gone)

    def leave(self, user_id, jti):
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
