"""
The abuse limits: token buckets per connection and message, the per-address
connection cap, and slow readers paused and dropped, on in-memory transports
with a fake clock and once over real TCP.
"""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from dreamraid.config import ConfigError
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.server import ServerFactory
from dreamraid.services.limits import AddressCap, Rate, RequestBuckets
from dreamraid.services.liveness import Liveness
from tests.support import make_settings
from tests.test_server_protocol import Replies


def address(host, port=40000):
    return IPv4Address("TCP", host, port)


class RequestBucketsTests(TestCase):
    """Token buckets by message name."""

    def setUp(self):
        self.clock = Clock()
        self.buckets = RequestBuckets(self.clock, {"*": Rate(10, 3), "hunt": Rate(1, 1)})

    def test_burst_then_refill(self):
        """A full bucket lets the burst through, then one request per 1/rate seconds."""
        self.assertEqual([self.buckets.allow("ping") for _ in range(4)], [True, True, True, False])
        self.clock.advance(0.05)
        self.assertFalse(self.buckets.allow("ping"))
        self.clock.advance(0.05)
        self.assertTrue(self.buckets.allow("ping"))
        self.assertFalse(self.buckets.allow("ping"))

    def test_refill_stops_at_burst(self):
        """A long silence refills the bucket to its burst, no more."""
        self.clock.advance(3600)
        self.assertEqual(sum(self.buckets.allow("ping") for _ in range(10)), 3)

    def test_each_message_has_its_own_bucket(self):
        """Messages named in the rates use theirs; others share the default rate, each in a bucket of its own."""
        self.assertTrue(self.buckets.allow("hunt"))
        self.assertFalse(self.buckets.allow("hunt"))
        self.assertEqual(sum(self.buckets.allow("ping") for _ in range(5)), 3)
        self.assertEqual(sum(self.buckets.allow("move_item") for _ in range(5)), 3)

    def test_no_default_means_unlimited(self):
        """With no C{*} rate, a message not named is never limited."""
        buckets = RequestBuckets(self.clock, {"hunt": Rate(1, 1)})
        self.assertTrue(all(buckets.allow("ping") for _ in range(1000)))


class LimitSettingsTests(TestCase):
    """The limits' settings, as an operator writes them."""

    def test_parsed(self):
        game = make_settings(game_rate_limits="*=20/40 hunt=2/4", game_frame_rate="100/200").game
        self.assertEqual(game.rate_limits, {"*": Rate(20, 40), "hunt": Rate(2, 4)})
        self.assertEqual(game.frame_rate, Rate(100, 200))
        off = make_settings(game_rate_limits="off", game_frame_rate="off").game
        self.assertEqual((off.rate_limits, off.frame_rate), ({}, None))

    def test_refused_with_the_setting_named(self):
        for setting, text in [("game_rate_limits", "hunt"), ("game_rate_limits", "no_such_message=1/1"),
                              ("game_rate_limits", "hunt=off"), ("game_frame_rate", "100"),
                              ("game_frame_rate", "0/1")]:
            with self.assertRaises(ConfigError) as raised:
                make_settings(**{setting: text})
            self.assertIn(setting.split("_", 1)[1], str(raised.exception))


class AddressCapTests(TestCase):
    def test_cap_and_release(self):
        """An address is let in up to the cap, and again once one of its connections closes."""
        cap = AddressCap(2)
        self.assertEqual([cap.admit("10.0.0.1") for _ in range(3)], [True, True, False])
        self.assertTrue(cap.admit("10.0.0.2"))
        cap.release("10.0.0.1")
        self.assertTrue(cap.admit("10.0.0.1"))
        self.assertEqual((cap.held("10.0.0.1"), cap.held("10.0.0.2"), cap.held("10.0.0.3")), (2, 1, 0))

    def test_zero_is_no_cap(self):
        cap = AddressCap(0)
        self.assertTrue(all(cap.admit("10.0.0.1") for _ in range(10000)))


class ProtocolLimitsTests(TestCase):
    """The server protocol applying the limits."""

    def setUp(self):
        self.clock = Clock()
        settings = make_settings(
            game_rate_limits="*=5/5 ping=2/2", game_rate_limited_drop="4", game_connections_per_address="2",
            game_slow_reader_timeout="3", game_write_buffer_limit="2048").game
        self.liveness = Liveness(self.clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        self.factory = ServerFactory("dreamraid-test", settings, self.liveness)

    def connect(self, host="10.0.0.1"):
        built = self.factory.buildProtocol(address(host))
        transport = StringTransport()
        built.makeConnection(transport)
        if getattr(built, "state", None) is not None:  # authenticated, so no auth timeout runs out while the clock moves
            self.liveness.authenticated(built.state)
        return built, transport

    def ping(self, server, request_id):
        server.dataReceived(packets.PING.encode(request_id, {"nonce": request_id}))

    def test_rate_limited_reply(self):
        """Past its bucket a request is answered RATE_LIMITED with its id; the bucket refills with time."""
        server, transport = self.connect()
        replies = Replies(transport)
        for request_id in (1, 2, 3):
            self.ping(server, request_id)
        self.assertEqual([(r[0], r[1], r[2].get("code")) for r in replies.take()],
                         [("pong", 1, None), ("pong", 2, None), ("error", 3, ErrorCode.RATE_LIMITED)])
        self.clock.advance(0.5)
        self.ping(server, 4)
        self.assertEqual(replies.take(), [("pong", 4, {"nonce": 4})])
        self.assertEqual(self.factory.limited["requests"], 1)

    def test_flood_closes(self):
        """C{rate_limited_drop} refusals in a row close the connection with RATE_LIMITED."""
        server, transport = self.connect()
        replies = Replies(transport)
        for request_id in range(1, 6):
            self.ping(server, request_id)
        self.assertFalse(transport.disconnecting)
        self.ping(server, 6)
        codes = [r[2].get("code") for r in replies.take()]
        self.assertEqual(codes, [None, None, ErrorCode.RATE_LIMITED, ErrorCode.RATE_LIMITED,
                                 ErrorCode.RATE_LIMITED, ErrorCode.RATE_LIMITED])
        self.assertTrue(transport.disconnecting)

    def test_allowed_request_resets_the_flood_count(self):
        """Refusals only close a connection when they come in a row."""
        server, transport = self.connect()
        for round_ in range(5):
            for request_id in range(3):
                self.ping(server, request_id)
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

    def test_bad_frames_are_limited_too(self):
        """Frames that do not decode draw on the default bucket: a flood of them is refused, then closed."""
        server, transport = self.connect()
        replies = Replies(transport)
        garbage = b"\x03\x00\xff\xff\x01"  # shorter than a frame header
        for _ in range(5):
            server.dataReceived(garbage)
        self.assertEqual([r[2]["code"] for r in replies.take()], [ErrorCode.MALFORMED_FRAME] * 5)
        for _ in range(4):
            server.dataReceived(garbage)
        self.assertEqual([r[2]["code"] for r in replies.take()], [ErrorCode.RATE_LIMITED] * 4)
        self.assertTrue(transport.disconnecting)

    def test_rate_limits_off(self):
        settings = make_settings(game_rate_limits="off", game_frame_rate="off").game
        factory = ServerFactory("dreamraid-test", settings, self.liveness)
        server = factory.buildProtocol(address("10.0.0.1"))
        transport = StringTransport()
        server.makeConnection(transport)
        for request_id in range(1, 501):
            self.ping(server, request_id)
        self.assertEqual({r[0] for r in Replies(transport).take()}, {"pong"})

    def test_frame_budget_delays_reading(self):
        """Past its frame budget a connection is not read until the budget refills: every frame is answered, later."""
        factory = ServerFactory("dreamraid-test", make_settings(
            game_rate_limits="off", game_frame_rate="10/4").game, self.liveness)
        server = factory.buildProtocol(address("10.0.0.1"))
        transport = StringTransport()
        server.makeConnection(transport)
        replies = Replies(transport)
        server.dataReceived(b"".join(packets.PING.encode(i, {"nonce": i}) for i in range(1, 11)))
        self.assertEqual([r[1] for r in replies.take()], [1, 2, 3, 4])
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(0.1)
        self.assertEqual([r[1] for r in replies.take()], [5])
        self.clock.pump([0.1] * 10)
        self.assertEqual([r[1] for r in replies.take()], [6, 7, 8, 9, 10])
        self.assertEqual(transport.producerState, "producing")
        self.assertGreater(factory.limited["frame_budget"], 0)

    def test_frame_budget_waits_for_a_slow_reader(self):
        """A refilled budget does not read a client whose replies are still backed up."""
        factory = ServerFactory("dreamraid-test", make_settings(
            game_rate_limits="off", game_frame_rate="10/1", game_slow_reader_timeout="30").game, self.liveness)
        server = factory.buildProtocol(address("10.0.0.1"))
        transport = StringTransport()
        server.makeConnection(transport)
        self.liveness.authenticated(server.state)
        server.dataReceived(b"".join(packets.PING.encode(i, {"nonce": i}) for i in range(1, 4)))
        server.pauseProducing()  # the transport: its buffer is full
        self.clock.advance(1)  # the budget refills: pings 2 and then 3 are taken, which spends it again
        self.assertEqual(transport.producerState, "paused")
        server.resumeProducing()  # the replies drained, but the budget is spent
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(0.1)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual([r[1] for r in Replies(transport).take()], [1, 2, 3])

    def test_connections_per_address(self):
        """An address over its cap is told TOO_MANY_CONNECTIONS and closed; one closing lets another in."""
        first, _ = self.connect()
        self.connect()
        refused, transport = self.connect()
        self.assertEqual(Replies(transport).take()[0][2]["code"], ErrorCode.TOO_MANY_CONNECTIONS)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.limited["connections"], 1)
        self.assertEqual(len(self.liveness), 2)
        _, other = self.connect("10.0.0.2")
        self.assertFalse(other.disconnecting)
        first.connectionLost(None)
        _, again = self.connect()
        self.assertFalse(again.disconnecting)

    def test_slow_reader_resumed_in_time(self):
        """A client whose replies back up is not read from until it catches up, then read again."""
        server, transport = self.connect()
        server.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(2.9)
        server.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.clock.advance(10)
        self.assertFalse(transport.disconnecting)

    def test_slow_reader_dropped_after_timeout(self):
        """A client that leaves its replies unread for C{slow_reader_timeout} is dropped."""
        server, transport = self.connect()
        server.pauseProducing()
        self.clock.advance(3)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.factory.limited["slow_reader"], 1)

    def test_slow_reader_dropped_past_the_byte_limit(self):
        """Writes to a client that reads none of them are bounded: past the limit it is dropped at once."""
        server, transport = self.connect()
        server.pauseProducing()
        for nonce in range(200):  # server pings keep coming while it reads nothing
            server.send_ping(nonce)
            if transport.disconnecting:
                break
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(len(transport.value()), 2048 + len(packets.PING.encode(0, {"nonce": 0})))


class _Flooder(protocol.Protocol):
    """Writes pings and never reads a reply."""

    def __init__(self):
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.pauseProducing()  # read nothing
        self.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(b"".join(packets.PING.encode(i % 60000 + 1, {"nonce": i}) for i in range(40000)))

    def connectionLost(self, reason):
        self.closed.callback(None)


class SlowReaderOverTcpTests(TestCase):
    """A real client that sends and never reads is dropped; the server does not buffer without bound."""

    async def test_dropped(self):
        settings = make_settings(game_rate_limits="off", game_frame_rate="off", game_slow_reader_timeout="0.5",
                                 game_write_buffer_limit="65536").game
        liveness = Liveness(reactor, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        factory = ServerFactory("dreamraid-test", settings, liveness)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        server_lost = defer.Deferred()
        built = factory.buildProtocol

        def watched(addr):
            server = built(addr)
            lost, made = server.connectionLost, server.connectionMade

            def connectionMade():
                made()
                # Small kernel buffers: the pongs back up in the server's own buffer soon.
                server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

            def connectionLost(reason):
                lost(reason)
                server_lost.callback(factory.limited["slow_reader"])
            server.connectionMade, server.connectionLost = connectionMade, connectionLost
            return server
        factory.buildProtocol = watched
        flooder = _Flooder()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), flooder)
        self.assertEqual(await server_lost, 1)
        flooder.transport.abortConnection()  # reading nothing, it cannot see the server close
        await flooder.closed
        self.assertEqual(len(liveness), 0)
