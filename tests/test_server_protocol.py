"""The servers' shared client protocol over an in-memory transport."""

import struct

import pymysql
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from dreamraid.errors import ERROR_TEXT, ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.protocols.game import GameFactory
from dreamraid.services.avatar import Player
from dreamraid.protocols.server import ServerFactory, ServerProtocol, handles
from dreamraid.services.liveness import IPeer, Liveness
from dreamraid.services.rediscluster import DeadlineExceeded
from tests.support import make_settings


class Replies:
    """Decodes what a server wrote to its transport."""

    def __init__(self, transport):
        self.transport = transport

    def take(self):
        data, frames = self.transport.value(), []
        self.transport.clear()
        while data:
            (length,) = struct.unpack_from("<H", data)
            frames.append(packets.decode_frame(data[: 2 + length]))
            data = data[2 + length:]
        return [(f.message.name, f.request_id, f.body) for f in frames]


class TestableProtocol(ServerProtocol):
    """A server protocol with handlers that exercise the dispatch paths."""

    @handles(packets.WELCOME)  # any message will do: this one needs authentication
    def needs_auth(self, body):
        return packets.PONG, {"nonce": 1}


class ServerProtocolTests(TestCase):
    """Dispatch, replies, errors and liveness hooks."""

    def setUp(self):
        self.clock = Clock()
        settings = make_settings(game_max_frame_size="64").game
        self.liveness = Liveness(self.clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        self.liveness.startService()
        self.addCleanup(self.liveness.stopService)
        self.factory = ServerFactory("dreamraid-test", settings, self.liveness)
        self.factory.protocol = TestableProtocol
        self.protocol, self.transport = self.connect()
        self.replies = Replies(self.transport)

    def connect(self):
        protocol = self.factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, message, request_id, body):
        self.protocol.dataReceived(message.encode(request_id, body))

    def test_provides_peer(self):
        """The protocol is what liveness drives."""
        verifyObject(IPeer, self.protocol)

    def test_ping_pong(self):
        """A client ping gets a pong echoing nonce and request id."""
        self.send(packets.PING, 42, {"nonce": 7})
        self.assertEqual(self.replies.take(), [("pong", 42, {"nonce": 7})])

    def test_request_id_zero_is_refused(self):
        """
        A request with id 0, which marks the server's pushes, is refused
        with ZERO_REQUEST_ID (its answer could not be told from a push) and
        not handled; the connection stays open.  A pong, which answers a
        ping push, is the one message a client sends with id 0.
        """
        self.send(packets.PING, 0, {"nonce": 7})
        self.send(packets.PONG, 0, {"nonce": 7})
        self.send(packets.PING, 1, {"nonce": 8})
        [(name, request_id, body), pong] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 0, ErrorCode.ZERO_REQUEST_ID))
        self.assertEqual(pong, ("pong", 1, {"nonce": 8}))
        self.assertFalse(self.transport.disconnecting)

    def test_pipelined_requests(self):
        """Several requests in one segment get their replies in order, each with its id."""
        self.protocol.dataReceived(b"".join(packets.PING.encode(i, {"nonce": i * 10}) for i in (1, 2, 3)))
        self.assertEqual([r[1:] for r in self.replies.take()], [(1, {"nonce": 10}), (2, {"nonce": 20}), (3, {"nonce": 30})])

    def test_split_frame(self):
        """A frame that arrives a byte at a time is decoded once whole."""
        for byte in packets.PING.encode(5, {"nonce": 1}):
            self.protocol.dataReceived(bytes([byte]))
        self.assertEqual(self.replies.take(), [("pong", 5, {"nonce": 1})])

    def test_hello(self):
        """hello gets welcome with the server's limits."""
        self.send(packets.HELLO, 1, {"protocol_version": packets.PROTOCOL_VERSION, "client": "t"})
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id), ("welcome", 1))
        self.assertEqual(body["ping_interval_ms"], 1000)
        self.assertEqual(body["max_frame_size"], 64)
        self.assertTrue(body["server"].startswith("dreamraid-test/"))

    def test_wrong_version(self):
        """hello with another protocol version gets UNSUPPORTED_VERSION."""
        self.send(packets.HELLO, 2, {"protocol_version": 99, "client": "t"})
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 2, ErrorCode.UNSUPPORTED_VERSION))

    def test_unknown_message(self):
        """An unknown message id is answered with UNKNOWN_MESSAGE and its request id; the connection stays."""
        self.protocol.dataReceived(struct.pack("<HHI", 6, 4000, 9))
        self.send(packets.PING, 10, {"nonce": 1})
        replies = self.replies.take()
        self.assertEqual(replies[0][:2], ("error", 9))
        self.assertEqual(replies[0][2]["code"], ErrorCode.UNKNOWN_MESSAGE)
        self.assertEqual(replies[1], ("pong", 10, {"nonce": 1}))
        self.assertFalse(self.transport.disconnecting)

    def test_malformed_body(self):
        """An undecodable body is answered with MALFORMED_BODY and the request id."""
        self.protocol.dataReceived(struct.pack("<HHIH", 8, packets.PING.id, 3, 1))
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 3, ErrorCode.MALFORMED_BODY))

    def test_short_frame(self):
        """A frame shorter than its header is answered with MALFORMED_FRAME, request id 0."""
        self.protocol.dataReceived(b"\x01\x00\x00")
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 0, ErrorCode.MALFORMED_FRAME))

    def test_oversized_frame(self):
        """A frame over the maximum gets FRAME_TOO_LARGE and the connection closes."""
        self.protocol.dataReceived(struct.pack("<H", 65) + b"x" * 65)
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 0, ErrorCode.FRAME_TOO_LARGE))
        self.assertTrue(self.transport.disconnecting)

    def test_not_accepted(self):
        """A message the server never accepts from a client gets NOT_ACCEPTED."""
        self.send(packets.ERROR, 4, {"code": 1, "detail": ""})
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 4, ErrorCode.NOT_ACCEPTED))

    def test_needs_auth(self):
        """A handler that needs authentication refuses an unauthenticated connection, then serves it."""
        welcome = {"protocol_version": 1, "server": "", "ping_interval_ms": 0, "max_frame_size": 0}
        self.send(packets.WELCOME, 5, welcome)
        self.assertEqual(self.replies.take()[0][2]["code"], ErrorCode.NOT_AUTHENTICATED)
        self.liveness.authenticated(self.protocol.state)
        self.send(packets.WELCOME, 6, welcome)
        self.assertEqual(self.replies.take(), [("pong", 6, {"nonce": 1})])

    def test_deferred_and_refused_results(self):
        """A Deferred result is sent when it fires; RequestRefused becomes its code; a crash is INTERNAL_ERROR."""
        d = Deferred()
        self.protocol.ping = lambda body: d
        self.send(packets.PING, 7, {"nonce": 1})
        self.assertEqual(self.replies.take(), [])
        d.callback((packets.PONG, {"nonce": 2}))
        self.assertEqual(self.replies.take(), [("pong", 7, {"nonce": 2})])

        async def refuse(body):
            raise RequestRefused(ErrorCode.NOT_AUTHENTICATED, "who are you")

        self.protocol.ping = refuse
        self.send(packets.PING, 8, {"nonce": 1})
        self.assertEqual(self.replies.take(), [("error", 8, {"code": ErrorCode.NOT_AUTHENTICATED, "detail": "who are you"})])

        self.protocol.ping = lambda body: 1 / 0
        self.send(packets.PING, 9, {"nonce": 1})
        self.assertEqual(self.replies.take()[0][2]["code"], ErrorCode.INTERNAL_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_store_unavailable(self):
        """
        A Redis or MariaDB outage is UNAVAILABLE, not INTERNAL_ERROR: one
        warning, then the same failure of the same message is only counted
        for a minute (on any connection), and the next warning says how
        many it left out.
        """
        deadline = DeadlineExceeded("GET k: no reply by the deadline")
        mysql_down = pymysql.err.OperationalError(2003, "refused")
        with capturedLogs() as logged:
            self.protocol.ping = lambda body: defer.fail(deadline)
            for request_id in (1, 2, 3):
                self.send(packets.PING, request_id, {"nonce": 1})
            first = self.replies.take()
            self.clock.advance(60)
            self.protocol, transport = self.connect()
            self.protocol.ping = lambda body: defer.fail(deadline)
            self.send(packets.PING, 4, {"nonce": 1})
            self.protocol.ping = lambda body: defer.fail(mysql_down)
            self.send(packets.PING, 5, {"nonce": 1})
        errors = [(request_id, body["code"]) for name, request_id, body in first + Replies(transport).take()]
        self.assertEqual(errors, [(i, ErrorCode.UNAVAILABLE) for i in (1, 2, 3, 4, 5)])
        warnings = [(e["log_level"], e["count"], e["error"]) for e in logged if "count" in e]
        self.assertEqual(warnings, [(LogLevel.warn, 1, deadline), (LogLevel.warn, 3, deadline),
                                    (LogLevel.warn, 1, mysql_down)])
        self.assertIn("ping requests failed: GET k: no reply by the deadline (2 more like it in the last 60 s)",
                      [formatEvent(e) for e in logged])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_server_ping_and_pong(self):
        """The sweep pings; the client's pong records a round trip."""
        self.clock.advance(1)
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id), ("ping", 0))
        self.clock.advance(0.125)
        self.send(packets.PONG, 0, body)
        self.assertEqual(self.protocol.state.rtt, 0.125)
        self.assertEqual(self.replies.take(), [])

    def test_auth_timeout_drop(self):
        """A connection that never authenticates is told AUTH_TIMEOUT and closed after 5 s."""
        self.clock.advance(4.9)
        self.replies.take()
        self.clock.advance(0.1)
        [(name, request_id, body)] = self.replies.take()
        self.assertEqual((name, request_id, body["code"]), ("error", 0, ErrorCode.AUTH_TIMEOUT))
        self.assertTrue(self.transport.disconnecting)

    def test_idle_drop(self):
        """An authenticated connection silent for 15 s is told IDLE_TIMEOUT and closed."""
        self.liveness.authenticated(self.protocol.state)
        self.clock.pump([1] * 14)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertEqual(self.replies.take()[-1][2]["code"], ErrorCode.IDLE_TIMEOUT)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_forgets(self):
        """A closed connection leaves liveness."""
        self.assertEqual(len(self.liveness), 1)
        self.protocol.connectionLost(None)
        self.assertEqual(len(self.liveness), 0)


class OrderingProtocol(ServerProtocol):
    """
    Handlers whose answers the test releases one by one: C{register} and
    C{login} are ordered (C{login} needs authentication), C{enter_world} is
    not (and needs authentication).  A C{register} named "auth"
    authenticates the connection when released; one named "refuse" is
    refused and closes the connection, as a refused authenticate does.
    """

    def connectionMade(self):
        super().connectionMade()
        self.calls, self.pending = [], []

    def _answer(self, kind, body):
        self.calls.append((kind, body["name"] if "name" in body else body["token"]))
        d = Deferred()
        self.pending.append(d)
        return d

    @handles(packets.REGISTER, needs_auth=False, ordered=True)
    async def ordered(self, body):
        if body["name"] == "refuse":
            self.close_after_reply = True
            raise RequestRefused(ErrorCode.SESSION_NOT_LIVE)
        await self._answer("ordered", body)
        if body["name"] == "auth":
            self.factory.liveness.authenticated(self.state)
        return packets.REGISTERED, {"user_id": len(self.calls)}

    @handles(packets.LOGIN, ordered=True)
    def ordered_needing_auth(self, body):
        return self._answer("ordered_needing_auth", body).addCallback(
            lambda _: (packets.REGISTERED, {"user_id": len(self.calls)}))

    @handles(packets.ENTER_WORLD)
    def unordered(self, body):
        return self._answer("unordered", body).addCallback(lambda _: (packets.REGISTERED, {"user_id": 0}))


class OrderedRequestTests(TestCase):
    """Ordered requests run one at a time per connection, in arrival order; the rest stay concurrent."""

    def setUp(self):
        self.clock = Clock()
        settings = make_settings().game
        self.liveness = Liveness(self.clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        self.liveness.startService()
        self.addCleanup(self.liveness.stopService)
        self.factory = ServerFactory("dreamraid-test", settings, self.liveness)
        self.factory.protocol = OrderingProtocol
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.replies = Replies(self.transport)

    def write(self, *frames):
        """Every C{(message, request id, body)} in one write."""
        self.protocol.dataReceived(b"".join(message.encode(i, body) for message, i, body in frames))

    def release(self, count=1):
        """Let the oldest C{count} handlers still waiting answer."""
        for _ in range(count):
            self.protocol.pending.pop(0).callback(None)

    def test_one_at_a_time_in_order_while_others_go_on(self):
        """
        Ordered requests in one write start only once the one before has
        answered, in arrival order; an unordered one is served at once
        meanwhile, and its answer does not wait for theirs.
        """
        self.liveness.authenticated(self.protocol.state)
        self.write((packets.REGISTER, 1, {"name": "a", "password": ""}),
                   (packets.LOGIN, 2, {"name": "b", "password": ""}),
                   (packets.ENTER_WORLD, 3, {"token": "c"}),
                   (packets.REGISTER, 4, {"name": "d", "password": ""}))
        self.assertEqual(self.protocol.calls, [("ordered", "a"), ("unordered", "c")])
        self.protocol.pending.pop(1).callback(None)  # the unordered one answers first
        self.assertEqual([r[1] for r in self.replies.take()], [3])
        self.release()
        self.assertEqual(self.protocol.calls[2:], [("ordered_needing_auth", "b")])
        self.assertEqual([r[1] for r in self.replies.take()], [1])
        self.release()
        self.assertEqual(self.protocol.calls[3:], [("ordered", "d")])
        self.release()
        self.assertEqual([r[1] for r in self.replies.take()], [2, 4])
        self.assertEqual(self.protocol._steps_waiting, 0)

    def test_authentication_is_checked_when_an_ordered_request_runs(self):
        """
        Behind an ordered request that authenticates, in the same write, an
        ordered request and an unordered one that need authentication are
        served once it has; without it they are refused NOT_AUTHENTICATED.
        """
        self.write((packets.REGISTER, 1, {"name": "auth", "password": ""}),
                   (packets.LOGIN, 2, {"name": "b", "password": ""}),
                   (packets.ENTER_WORLD, 3, {"token": "c"}))
        self.assertEqual(self.protocol.calls, [("ordered", "auth")])
        self.release()
        self.assertEqual(self.protocol.calls[1:], [("ordered_needing_auth", "b")])
        self.release()
        self.assertEqual(self.protocol.calls[2:], [("unordered", "c")])
        self.release()
        self.assertEqual([(name, i) for name, i, _ in self.replies.take()],
                         [("registered", 1), ("registered", 2), ("registered", 3)])

        other = self.factory.buildProtocol(None)
        transport = StringTransport()
        other.makeConnection(transport)
        other.dataReceived(packets.REGISTER.encode(1, {"name": "a", "password": ""})
                           + packets.LOGIN.encode(2, {"name": "b", "password": ""})
                           + packets.ENTER_WORLD.encode(3, {"token": "c"}))
        other.pending.pop(0).callback(None)
        self.assertEqual([(name, i, body.get("code")) for name, i, body in Replies(transport).take()],
                         [("registered", 1, None), ("error", 2, ErrorCode.NOT_AUTHENTICATED),
                          ("error", 3, ErrorCode.NOT_AUTHENTICATED)])
        self.assertEqual(other.calls, [("ordered", "a")])

    def test_a_refusal_that_closes_ends_the_write(self):
        """
        A refused request that closes the connection (as a refused
        authenticate does) is answered with its error, then the connection
        closes; nothing after it in the same write, ordered or not, runs.
        """
        self.write((packets.REGISTER, 1, {"name": "refuse", "password": ""}),
                   (packets.PING, 2, {"nonce": 1}),
                   (packets.REGISTER, 3, {"name": "auth", "password": ""}))
        self.assertEqual(self.replies.take(), [("error", 1, {"code": ErrorCode.SESSION_NOT_LIVE,
                                                             "detail": ERROR_TEXT[ErrorCode.SESSION_NOT_LIVE]})])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.protocol.calls, [])

    def test_steps_queued_when_the_connection_closes_are_skipped(self):
        """Ordered requests still waiting when the connection drops never run; a step of the protocol's own does."""
        self.write((packets.REGISTER, 1, {"name": "a", "password": ""}),
                   (packets.REGISTER, 2, {"name": "b", "password": ""}))
        ran = []
        self.protocol.connectionLost(None)
        self.protocol.in_order(lambda: ran.append("leave"))
        self.release()
        self.assertEqual((self.protocol.calls, ran), ([("ordered", "a")], ["leave"]))
        self.assertEqual(self.replies.take(), [])

    def test_a_failing_step_is_logged_and_the_next_runs(self):
        """A step that raises is logged with its traceback; the steps after it still run."""
        ran = []
        self.protocol.in_order(lambda: 1 / 0)
        self.protocol.in_order(lambda: ran.append("next"))
        self.assertEqual(ran, ["next"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class FailingLogoutTests(TestCase):
    """A game server logout whose leave fails still leaves the connection nobody's, and closes it."""

    def test_a_failed_logout_closes(self):
        """The leave raises (a bug): the client gets INTERNAL_ERROR, the connection is closed and holds no user."""
        class BrokenPlayers:
            def leave(self, connection, leave_game=None, wait_for_handoff=True):
                raise TypeError("a bug in the leave")

        clock = Clock()
        settings = make_settings().game
        liveness = Liveness(clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        factory = GameFactory("dreamraid-test", settings, liveness, BrokenPlayers(), None, None, None, None, None)
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        protocol.player = Player(5, "n", "jti", "test 1", protocol, clock, lambda player: None)
        liveness.authenticated(protocol.state)
        protocol.dataReceived(packets.LOGOUT.encode(1, {}))
        self.flushLoggedErrors(TypeError)
        [(name, request_id, body)] = Replies(transport).take()
        self.assertEqual((name, request_id, body["code"]), ("error", 1, ErrorCode.INTERNAL_ERROR))
        self.assertIsNone(protocol.user_id)
        self.assertTrue(transport.disconnecting)


class PushWhileOverBudgetTests(TestCase):
    """A push to a connection whose frame budget is spent goes out; it does not touch the held frame."""

    def test_a_push_while_a_frame_waits_for_the_budget(self):
        clock = Clock()
        settings = make_settings(game_rate_limits="off", game_frame_rate="10/4").game
        liveness = Liveness(clock, settings.ping_interval, settings.idle_timeout, settings.auth_timeout)
        factory = GameFactory("dreamraid-test", settings, liveness, None, None, None, None, None, None)
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        replies = Replies(transport)
        protocol.dataReceived(b"".join(packets.PING.encode(i, {"nonce": i}) for i in range(1, 7)))
        self.assertEqual([r[1] for r in replies.take()], [1, 2, 3, 4])  # 5 waits for the budget
        protocol.push("matchmaking", {"state": "queued", "group": 1})  # once raised: the held frame is bytes
        self.assertEqual([r[0] for r in replies.take()], ["matchmaking"])
        clock.pump([0.1] * 3)
        self.assertEqual([r[1] for r in replies.take()], [5, 6])
