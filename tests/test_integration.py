"""
Both servers against the real stack: the Redis Cluster's shape, ping/pong and
bad frames over real TCP, /health both ways, and the twistd plugins.
"""

import os
import signal
import struct

import txredisapi
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from dreamraid import game_tap, session_tap
from dreamraid.client import ConnectionClosed, connect
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.services.database import MYSQL_UNAVAILABLE, Database
from tests.support import ROOT, STACK_CONFIG, RunningServer, eventually, free_port, http_get, make_settings, require_stack, stack


class StackTests(TestCase):
    """The stack `make test` runs against is the one the spec asks for."""

    def setUp(self):
        require_stack()

    async def cluster_nodes(self):
        host, port = make_settings().redis.startup_nodes[0]
        connection = await txredisapi.Connection(host, port, reconnect=False, connectTimeout=2)
        try:
            return await connection.execute_command("CLUSTER", "NODES")
        finally:
            await connection.disconnect()

    @defer.inlineCallbacks
    def test_three_masters_three_replicas(self):
        """The Redis stack is a healthy cluster of 3 masters, each with 1 replica, all slots covered."""
        text = yield defer.Deferred.fromCoroutine(self.cluster_nodes())
        nodes = [line.split() for line in text.splitlines() if line.strip()]
        masters = [n for n in nodes if "master" in n[2].split(",")]
        replicas = [n for n in nodes if "slave" in n[2].split(",")]
        self.assertEqual((len(masters), len(replicas)), (3, 3))
        self.assertFalse([n for n in nodes if "fail" in n[2] or n[7] != "connected"])
        self.assertEqual(sorted(r[3] for r in replicas), sorted(m[0] for m in masters))
        slots = 0
        for master in masters:
            for span in master[8:]:
                low, _, high = span.partition("-")
                slots += int(high or low) - int(low) + 1
        self.assertEqual(slots, 16384)

    @defer.inlineCallbacks
    def test_mariadb_answers(self):
        """MariaDB answers as the configured user."""
        database = Database(make_settings().mysql)
        database.startService()
        self.addCleanup(database.stopService)
        yield database.ping()


class RawFrames(protocol.Protocol):
    """A connection that writes raw bytes and collects what comes back."""

    def __init__(self):
        self.received = b""
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(None)

    def frames(self):
        data, out = self.received, []
        while len(data) >= 2:
            (length,) = struct.unpack_from("<H", data)
            out.append(packets.decode_frame(data[: 2 + length]))
            data = data[2 + length:]
        return out


class ServersTests(TestCase):
    """The game and session servers over real TCP and HTTP."""

    def setUp(self):
        require_stack()

    async def raw(self, server):
        raw = RawFrames()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", server.port), raw)
        self.addCleanup(lambda: raw.transport.loseConnection() or raw.closed)
        return raw

    async def exchange_ping(self, server):
        client = await server.client(self)
        welcome = await client.hello("integration-test")
        self.assertEqual(welcome["protocol_version"], packets.PROTOCOL_VERSION)
        rtt = await client.ping()
        self.assertGreaterEqual(rtt, 0)
        return client

    @defer.inlineCallbacks
    def test_game_ping_pong(self):
        """A game server answers hello and ping over real TCP."""
        server = RunningServer(game_tap, "game").start(self)
        yield defer.Deferred.fromCoroutine(self.exchange_ping(server))

    @defer.inlineCallbacks
    def test_session_ping_pong(self):
        """The session server answers hello and ping over real TCP."""
        server = RunningServer(session_tap, "session").start(self)
        yield defer.Deferred.fromCoroutine(self.exchange_ping(server))

    @defer.inlineCallbacks
    def test_bad_frames_leave_others_working(self):
        """Unknown, malformed and oversized frames are answered as documented while another client keeps working."""
        server = RunningServer(game_tap, "game").start(self)
        good = yield defer.Deferred.fromCoroutine(server.client(self))
        bad = yield defer.Deferred.fromCoroutine(self.raw(server))

        bad.transport.write(struct.pack("<HHI", 6, 999, 1))  # unknown message id
        bad.transport.write(struct.pack("<HHIH", 8, packets.PING.id, 2, 0))  # truncated body
        bad.transport.write(packets.PING.encode(3, {"nonce": 3}))
        yield eventually(lambda: defer.succeed(len(bad.frames()) >= 3))
        codes = [(f.request_id, f.message.name, f.body.get("code")) for f in bad.frames()[:3]]
        self.assertEqual(codes, [
            (1, "error", ErrorCode.UNKNOWN_MESSAGE), (2, "error", ErrorCode.MALFORMED_BODY), (3, "pong", None),
        ])
        yield defer.Deferred.fromCoroutine(good.ping())

        bad.transport.write(struct.pack("<H", 60000) + b"x" * 100)  # over max_frame_size
        yield bad.closed
        last = bad.frames()[-1]
        self.assertEqual((last.request_id, last.body["code"]), (0, ErrorCode.FRAME_TOO_LARGE))
        yield defer.Deferred.fromCoroutine(good.ping())

    @defer.inlineCallbacks
    def test_unauthenticated_connection_dropped(self):
        """A real connection that does not authenticate is closed after auth_timeout, told why."""
        server = RunningServer(game_tap, "game", ["--game-auth-timeout", "0.3"]).start(self)
        client = yield defer.Deferred.fromCoroutine(server.client(self))
        yield client.closed
        self.assertEqual(client.close_reason[0], ErrorCode.AUTH_TIMEOUT)
        with self.assertRaises(ConnectionClosed):
            yield defer.Deferred.fromCoroutine(client.ping())

    @defer.inlineCallbacks
    def test_health_ok(self):
        """/health is 200 on both servers when Redis (and MySQL) answer, and the game server hears kicks."""
        game = RunningServer(game_tap, "game").start(self)
        session = RunningServer(session_tap, "session").start(self)
        yield game.part("Players").when_listening()
        code, body = yield game.health()
        self.assertEqual((code, body), (200, {"status": "ok", "checks": {"redis": "ok", "kicks": "ok"}}))
        code, body = yield session.health()
        self.assertEqual((code, body), (200, {"status": "ok", "checks": {"redis": "ok", "mysql": "ok"}}))

    @defer.inlineCallbacks
    def test_health_redis_unreachable(self):
        """/health is 503 naming redis when no Redis node answers."""
        dead = f"127.0.0.1:{free_port()}"
        game = RunningServer(game_tap, "game", ["--redis-startup-nodes", dead]).start(self)
        code, body = yield game.health()
        self.assertEqual((code, body["status"]), (503, "unavailable"))
        self.assertIn(dead, body["checks"]["redis"])

    @defer.inlineCallbacks
    def test_health_mysql_stopped(self):
        """/health is 503 naming mysql while MariaDB is stopped, and 200 again once it is back."""
        session = RunningServer(session_tap, "session").start(self)
        code, _ = yield session.health()
        self.assertEqual(code, 200)
        yield defer.Deferred.fromCoroutine(stack("mysql-stop"))
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(stack("mysql-start")))
        code, body = yield session.health()
        self.assertEqual((code, body["checks"]["redis"]), (503, "ok"))
        self.assertNotEqual(body["checks"]["mysql"], "ok")
        yield defer.Deferred.fromCoroutine(stack("mysql-start"))
        code, body = yield session.health()
        self.assertEqual((code, body), (200, {"status": "ok", "checks": {"redis": "ok", "mysql": "ok"}}))
        # adbapi logs a failed rollback as an error when MariaDB goes away
        # under a query (the ranking board's loader may have one under way).
        self.flushLoggedErrors(*MYSQL_UNAVAILABLE)


class ProcessProtocol(protocol.ProcessProtocol):
    """Collects a child's output and its end."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(reason.value)


class TwistdPluginTests(TestCase):
    """The servers as an operator starts them: `twistd -n dreamraid-game`."""

    twistd = str(ROOT / ".venv" / "bin" / "twistd")

    def spawn(self, *args):
        process = ProcessProtocol()
        reactor.spawnProcess(process, self.twistd, [self.twistd, *args], env=dict(os.environ), path=str(ROOT))
        return process

    @defer.inlineCallbacks
    def test_help_lists_options(self):
        """twistd dreamraid-game --help and dreamraid-session --help list their settings."""
        game = self.spawn("dreamraid-game", "--help")
        session = self.spawn("dreamraid-session", "--help")
        yield game.ended
        yield session.ended
        self.assertIn(b"--game-listen", game.output)
        self.assertIn(b"--redis-startup-nodes", game.output)
        self.assertIn(b"--mysql-host", session.output)

    @defer.inlineCallbacks
    def test_bad_setting_stops_startup(self):
        """A bad setting on the command line stops twistd with a message naming it."""
        process = self.spawn("-n", "--pidfile=", "dreamraid-game", "--game-ping-interval", "never")
        reason = yield process.ended
        self.assertIsInstance(reason, error.ProcessTerminated)
        self.assertIn(b"setting game.ping_interval (--game-ping-interval)", process.output)

    @defer.inlineCallbacks
    def test_game_server_process(self):
        """`twistd -n dreamraid-game` serves ping/pong and stops on SIGTERM."""
        require_stack()
        port, http_port = free_port(), free_port()
        process = self.spawn(
            "-n", "--pidfile=", "dreamraid-game", "--config", str(STACK_CONFIG),
            "--game-listen", f"tcp:{port}:interface=127.0.0.1",
            "--game-http-listen", f"tcp:{http_port}:interface=127.0.0.1", "--game-udp-port", "0",
        )

        async def connected():
            try:
                return await connect(reactor, "127.0.0.1", port)
            except error.ConnectError:
                return None

        try:
            client = yield eventually(connected)
            rtt = yield defer.Deferred.fromCoroutine(client.ping())
            self.assertGreaterEqual(rtt, 0)
            code, _ = yield defer.Deferred.fromCoroutine(http_get(f"http://127.0.0.1:{http_port}/health"))
            self.assertEqual(code, 200)
            yield client.close()
        finally:
            if process.ended.called is False:
                os.kill(process.transport.pid, signal.SIGTERM)
        yield process.ended
        # twistd shuts down cleanly, then (Twisted 25+) re-raises the signal as its exit status.
        self.assertIn(b"Server Shut Down.", process.output)
        self.assertNotIn(b"Traceback", process.output)
