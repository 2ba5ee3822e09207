"""Liveness: pings, round-trip times, the idle and the authentication deadlines."""

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.errors import ErrorCode
from dreamraid.services.liveness import IPeer, Liveness


@implementer(IPeer)
class FakePeer:
    """Records what liveness asks of a connection."""

    state = None

    def __init__(self):
        self.pings, self.dropped = [], []

    def send_ping(self, nonce):
        self.pings.append(nonce)

    def drop(self, code):
        self.dropped.append(code)


class LivenessTests(TestCase):
    """Liveness driven by a task.Clock."""

    def setUp(self):
        self.clock = Clock()
        self.liveness = Liveness(self.clock, ping_interval=1.0, idle_timeout=15.0, auth_timeout=5.0)
        self.liveness.startService()
        self.addCleanup(self.liveness.stopService)
        self.peer = FakePeer()
        self.peer.state = self.liveness.connected(self.peer)

    def test_fake_peer_provides_interface(self):
        """The fake used here provides IPeer, as the real protocol does."""
        verifyObject(IPeer, self.peer)

    def test_pings_every_interval(self):
        """A ping goes out each interval with a fresh nonce."""
        self.liveness.authenticated(self.peer.state)
        self.clock.advance(0.99)
        self.assertEqual(self.peer.pings, [])
        self.clock.pump([0.01, 1, 1])
        self.assertEqual(self.peer.pings, [1, 2, 3])

    def slow_liveness(self, peers):
        """A liveness pinging every 10 s (slices of a whole second, exact on the clock) watching C{peers} new peers."""
        liveness = Liveness(self.clock, ping_interval=10.0, idle_timeout=150.0, auth_timeout=50.0)
        liveness.startService()
        self.addCleanup(liveness.stopService)
        made = [FakePeer() for _ in range(peers)]
        for peer in made:
            peer.state = liveness.connected(peer)
            liveness.authenticated(peer.state)
        return liveness, made

    def test_connections_are_pinged_a_slice_at_a_time(self):
        """Ten connections made at once are pinged over the interval, one each tenth of it, not in one burst."""
        _, peers = self.slow_liveness(10)
        pinged = []
        for _ in range(10):
            self.clock.advance(1)
            pinged.append(sum(len(p.pings) for p in peers))
        self.assertEqual(pinged, list(range(1, 11)))

    def test_a_peer_heard_within_the_interval_is_not_pinged(self):
        """Once its round trip is known, a peer that keeps sending (its own heartbeats) gets no pings; a silent one does."""
        liveness, [peer] = self.slow_liveness(1)
        self.clock.advance(10)
        liveness.pong(peer.state, peer.pings[-1])
        for _ in range(6):
            self.clock.advance(5)
            liveness.heard(peer.state)
        self.assertEqual(peer.pings, [1])
        self.clock.advance(9)  # its slice's sweep at 50 s finds it silent for the whole interval
        self.assertEqual(peer.pings, [1])
        self.clock.advance(1)
        self.assertEqual(peer.pings, [1, 2])

    def test_round_trip_time(self):
        """A pong with the last nonce records the round trip; a stale nonce does not."""
        self.clock.advance(1)
        self.clock.advance(0.25)
        self.liveness.pong(self.peer.state, 99)
        self.assertIsNone(self.peer.state.rtt)
        self.liveness.pong(self.peer.state, self.peer.pings[-1])
        self.assertEqual(self.peer.state.rtt, 0.25)
        self.liveness.pong(self.peer.state, self.peer.pings[-1])
        self.assertEqual(self.peer.state.rtt, 0.25)

    def test_auth_timeout(self):
        """An unauthenticated connection is dropped at the deadline, told why, and no longer watched."""
        self.clock.advance(4.99)
        self.assertEqual(self.peer.dropped, [])
        self.clock.advance(0.01)
        self.assertEqual(self.peer.dropped, [ErrorCode.AUTH_TIMEOUT])
        self.assertEqual(len(self.liveness), 0)
        self.clock.advance(20)
        self.assertEqual(self.peer.dropped, [ErrorCode.AUTH_TIMEOUT])

    def test_authenticated_in_time(self):
        """An authenticated connection outlives the deadline while it is heard."""
        self.clock.advance(4)
        self.liveness.authenticated(self.peer.state)
        for _ in range(30):
            self.clock.advance(1)
            self.liveness.heard(self.peer.state)
        self.assertEqual(self.peer.dropped, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # only the sweep is left

    def test_idle_timeout(self):
        """A connection silent for the idle timeout is dropped as idle."""
        self.liveness.authenticated(self.peer.state)
        self.clock.advance(10)
        self.liveness.heard(self.peer.state)
        self.clock.pump([1] * 14)
        self.assertEqual(self.peer.dropped, [])
        self.clock.advance(1)
        self.assertEqual(self.peer.dropped, [ErrorCode.IDLE_TIMEOUT])
        self.assertEqual(len(self.liveness), 0)

    def test_disconnected(self):
        """A closed connection is forgotten and its deadline cancelled."""
        self.liveness.disconnected(self.peer.state)
        self.clock.advance(20)
        self.assertEqual((self.peer.pings, self.peer.dropped), ([], []))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop(self):
        """Stopping the service stops the pings."""
        self.liveness.authenticated(self.peer.state)
        self.liveness.stopService()
        self.clock.advance(3)
        self.assertEqual(self.peer.pings, [])
