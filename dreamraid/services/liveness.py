"""
Connection liveness: ping each connection not heard from for an interval,
keep its round-trip time, drop it when it falls silent or fails to
authenticate in time.

One timer serves every connection (cheaper than a timer each at tens of
thousands of connections), sweeping a tenth of them every tenth of the
interval: a sweep of them all at once stalls the reactor for the length of
the burst of pings and pongs, and every request waits behind it.  A
connection that sent something within the interval is alive without a ping
(a client's own heartbeats keep it so), which halves the frames an active
connection costs.  The authentication deadline is a single delayed call per
connection, cancelled once it authenticates.
"""

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from dreamraid.errors import ErrorCode


class IPeer(Interface):
    """The far end of a connection, as liveness sees it: no bytes, no sockets."""

    state = Attribute("The L{PeerState} liveness keeps for this peer.")

    def send_ping(nonce):
        """Send a ping carrying C{nonce}; a pong with it should come back."""

    def drop(code):
        """Tell the peer why (an L{ErrorCode}) and close the connection."""


class PeerState:
    """What liveness knows of one connection."""

    __slots__ = (
        "peer", "connected_at", "last_heard", "authenticated",
        "nonce", "ping_sent_at", "rtt", "_auth_deadline", "_slice",
    )

    def __init__(self, peer, now):
        self.peer = peer
        self.connected_at = self.last_heard = now
        self.authenticated = False
        self.nonce = 0
        self.ping_sent_at = None
        self.rtt = None  # seconds, of the last answered server ping
        self._auth_deadline = None
        self._slice = None


SLICES = 10


class Liveness(Service):
    """Pings, round-trip times and the idle and authentication deadlines."""

    _log = Logger()

    def __init__(self, clock, ping_interval, idle_timeout, auth_timeout):
        self.clock = clock
        self._ping_interval = ping_interval
        self._idle_timeout = idle_timeout
        self._auth_timeout = auth_timeout
        self._peers = set()
        self._slices = [set() for _ in range(SLICES)]
        self._ticks = 0
        self._connections = 0
        self._sweep = LoopingCall.withCount(self._sweep_slices)
        self._sweep.clock = clock

    def startService(self):
        super().startService()
        self._sweep.start(self._ping_interval / SLICES, now=False)

    def stopService(self):
        if self._sweep.running:
            self._sweep.stop()
        return super().stopService()

    def __len__(self):
        return len(self._peers)

    def connected(self, peer):
        """Start watching C{peer}; returns its L{PeerState}."""
        state = PeerState(peer, self.clock.seconds())
        state._auth_deadline = self.clock.callLater(self._auth_timeout, self._auth_expired, state)
        # Round the slices, so connections that arrive together are swept apart.
        self._connections += 1
        state._slice = self._slices[(self._ticks + self._connections - 1) % SLICES]
        state._slice.add(state)
        self._peers.add(state)
        return state

    def disconnected(self, state):
        """Stop watching a connection that is gone."""
        self._peers.discard(state)
        if state._slice is not None:
            state._slice.discard(state)
        self._cancel_auth_deadline(state)

    def heard(self, state):
        """Something arrived from the peer: it is not idle.  Returns the time it was heard."""
        state.last_heard = now = self.clock.seconds()
        return now

    def authenticated(self, state):
        """
        The peer proved who it is: the authentication deadline no longer applies.

        This is the hook the login handlers call: the game server once a
        token checks out, the session server once a login succeeds.  Until
        then every connection is dropped C{auth_timeout} after it opened.
        """
        state.authenticated = True
        self._cancel_auth_deadline(state)

    def pong(self, state, nonce):
        """A pong arrived; if it answers the last ping, record the round trip."""
        if state.ping_sent_at is not None and nonce == state.nonce:
            state.rtt = self.clock.seconds() - state.ping_sent_at
            state.ping_sent_at = None

    def _sweep_slices(self, count):
        """The timer's tick: sweep the slice due now, and those of any ticks missed."""
        for _ in range(min(count, SLICES)):
            self._ticks += 1
            self.sweep(self._slices[self._ticks % SLICES])
        self._ticks += max(0, count - SLICES)

    def sweep(self, peers):
        """Drop the idle among C{peers}; ping those not heard from for an interval."""
        now = self.clock.seconds()
        for state in list(peers):
            silent = now - state.last_heard
            if silent >= self._idle_timeout:
                self._drop(state, ErrorCode.IDLE_TIMEOUT)
            elif silent >= self._ping_interval or state.rtt is None:
                state.nonce = (state.nonce + 1) & 0xFFFFFFFF
                state.ping_sent_at = now
                state.peer.send_ping(state.nonce)

    def _auth_expired(self, state):
        state._auth_deadline = None
        if state in self._peers and not state.authenticated:
            self._drop(state, ErrorCode.AUTH_TIMEOUT)

    def _cancel_auth_deadline(self, state):
        if state._auth_deadline is not None and state._auth_deadline.active():
            state._auth_deadline.cancel()
        state._auth_deadline = None

    def _drop(self, state, code):
        self.disconnected(state)
        state.peer.drop(code)

