"""
The fault proxy (dreamraid.faultproxy): on a fake reactor and clock, TCP
chunks wait the delay each way and jitter never reorders a stream, a close
follows the data, an abort resets every connection, a blackhole holds
everything and closes nothing until the restore; UDP gives each client its
own upstream socket, drops datagrams by the seeded loss each way, may
reorder them, and drops what is sent during a cut; stopping closes every
port and cancels every timer.  On real loopback sockets, bytes and
datagrams really pass with the delay, an abort resets both real ends, and
2000 datagrams lose exactly what the seed says.  The client library's route sends a raid's TCP and UDP
through the proxy; and, against the real stack, a whole raid of two players
clears through 200 ms one-way delay and 5 % datagram loss each way.
"""

import functools
import io
import math
import random
import sys

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, UserError
from twisted.internet.interfaces import IListeningPort, IUDPTransport
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from dreamraid.client import GameClient
from dreamraid.client.game import Raid
from dreamraid.faultproxy import ABORT, BLACKHOLE, FaultProxy, Faults, make_proxy, parse_arguments
from dreamraid.protocols import packets
from dreamraid.services.deferreds import gather
from dreamraid.services.matchmaking import matchmaking_keys
from tests.support import free_port, spawn
from tests.test_game import GameServerCase

TARGET = ("10.0.0.9", 9090)


@implementer(IListeningPort)
class FakeTCPPort:
    """A listening TCP port that remembers being closed."""

    def __init__(self, port):
        self.port, self.stopped = port, False

    def startListening(self):
        pass

    def stopListening(self):
        self.stopped = True

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)


@implementer(IUDPTransport, IListeningPort)
class FakeUDPPort:
    """A UDP socket: what is written to it is kept in C{sent} as C{(data, address)}."""

    def __init__(self, protocol, port):
        self.protocol, self.port = protocol, port
        self.sent, self.stopped = [], False

    def startListening(self):
        pass

    def write(self, packet, addr=None):
        self.sent.append((packet, addr))

    def connect(self, host, port):
        raise NotImplementedError

    def getHost(self):
        return IPv4Address("UDP", "127.0.0.1", self.port)

    def stopListening(self):
        self.stopped = True
        self.protocol.doStop()

    def setBroadcastAllowed(self, enabled):
        pass

    def getBroadcastAllowed(self):
        return False


class FakeReactor(MemoryReactorClock):
    """A memory reactor and clock that also listens on UDP, with fake sockets on ports from 40000 up."""

    def __init__(self):
        super().__init__()
        self.udp_ports, self.tcp_ports, self._next_port = [], [], 40000

    def _port_number(self, asked):
        if asked:
            return asked
        self._next_port += 1
        return self._next_port

    def listenTCP(self, port, factory, backlog=50, interface=""):
        super().listenTCP(port, factory, backlog, interface)
        listening = FakeTCPPort(self._port_number(port))
        self.tcp_ports.append(listening)
        return listening

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        listening = FakeUDPPort(protocol, self._port_number(port))
        protocol.makeConnection(listening)
        self.udp_ports.append(listening)
        return listening


class FakesTests(SynchronousTestCase):
    def test_fake_sockets_provide_their_interfaces(self):
        """The fake ports provide the interfaces of the real ones they stand for."""
        verifyObject(IListeningPort, FakeTCPPort(1))
        verifyObject(IUDPTransport, FakeUDPPort(DatagramProtocol(), 1))
        verifyObject(IListeningPort, FakeUDPPort(DatagramProtocol(), 1))


class FaultsTests(SynchronousTestCase):
    def test_bad_faults_are_refused(self):
        """Negative delays or jitter, and a loss outside 0..1, are refused with the name of the field."""
        for faults, name in (({"delay": -0.1}, "delay"), ({"jitter": -1}, "jitter"), ({"loss": 1.5}, "loss"),
                             ({"loss": -0.01}, "loss"), ({"delay": float("nan")}, "delay")):
            with self.assertRaises(ValueError) as raised:
                Faults(**faults)
            self.assertIn(name, str(raised.exception))

    def test_transit_is_the_delay_give_or_take_the_jitter(self):
        """Each transit time lies within delay +- jitter and never below 0; without jitter it is the delay."""
        rng = random.Random(1)
        times = [Faults(delay=0.2, jitter=0.05).transit(rng) for _ in range(1000)]
        self.assertTrue(all(0.15 <= t <= 0.25 for t in times))
        self.assertGreater(max(times) - min(times), 0.09)
        self.assertTrue(all(Faults(delay=0.01, jitter=0.05).transit(rng) >= 0 for _ in range(100)))
        self.assertEqual(Faults(delay=0.2).transit(rng), 0.2)

    def test_a_bad_cut_mode_is_refused(self):
        """A cut is a blackhole or an abort; anything else is refused."""
        proxy = FaultProxy(FakeReactor(), random.Random(1))
        with self.assertRaises(ValueError):
            proxy.cut("unplug")


class TCPCase(SynchronousTestCase):
    """A TCP forwarder on a fake reactor; C{connect()} makes a client's connection through it."""

    def setUp(self):
        self.reactor = FakeReactor()

    def start(self, faults, seed=1):
        self.proxy = FaultProxy(self.reactor, random.Random(seed), faults)
        self.forwarder = self.proxy.tcp(0, *TARGET)
        self.proxy.startService()

    def accept(self):
        """A client connects: the client's end (protocol, transport)."""
        factory = self.reactor.tcpServers[-1][1]
        client = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        client_transport = StringTransport()
        client.makeConnection(client_transport)
        return client, client_transport

    def dialled(self):
        """The upstream connection the proxy dialled last: (protocol, transport), now connected."""
        host, port, factory, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), TARGET)
        self.assertLessEqual(timeout, 10)
        server = factory.buildProtocol(IPv4Address("TCP", *TARGET))
        server_transport = StringTransport()
        server.makeConnection(server_transport)
        return server, server_transport

    def connect(self):
        client, client_transport = self.accept()
        server, server_transport = self.dialled()
        return client, client_transport, server, server_transport


class TCPForwarderTests(TCPCase):
    def test_bytes_wait_the_delay_each_way(self):
        """Bytes from either side reach the other only once the one-way delay has passed."""
        self.start(Faults(delay=0.2))
        client, client_transport, server, server_transport = self.connect()
        client.dataReceived(b"hit")
        self.reactor.advance(0.199)
        self.assertEqual(server_transport.value(), b"")
        self.reactor.advance(0.001)
        self.assertEqual(server_transport.value(), b"hit")
        server.dataReceived(b"hp")
        self.reactor.advance(0.1)
        self.assertEqual(client_transport.value(), b"")
        self.reactor.advance(0.1)
        self.assertEqual(client_transport.value(), b"hp")
        self.assertEqual((self.forwarder.counters["bytes_up"], self.forwarder.counters["bytes_down"]), (3, 2))

    def test_client_bytes_wait_for_the_upstream_connection(self):
        """The client's end is not read until the proxy's connection to the target is up."""
        self.start(Faults())
        _, client_transport = self.accept()
        self.assertEqual(client_transport.producerState, "paused")
        self.dialled()
        self.assertEqual(client_transport.producerState, "producing")

    def test_jitter_never_reorders_a_stream(self):
        """
        With jitter as large as the delay, 200 chunks sent a millisecond
        apart arrive in order (each never before the one sent before it),
        though their own delays would have reordered them.
        """
        seed, delay, jitter = 7, 0.1, 0.09
        self.start(Faults(delay=delay, jitter=jitter), seed)
        client, _, _, server_transport = self.connect()
        chunks = [b"%d," % i for i in range(200)]
        expected = random.Random(seed)
        own_due = []
        for i, chunk in enumerate(chunks):
            own_due.append(self.reactor.seconds() + delay + expected.uniform(-jitter, jitter))
            client.dataReceived(chunk)
            self.reactor.advance(0.001)
        self.assertNotEqual(own_due, sorted(own_due))  # the test means something: each on its own would reorder
        sent = b"".join(chunks)
        arrived = []
        for _ in range(400):
            self.reactor.advance(0.001)
            received = server_transport.value()
            self.assertTrue(sent.startswith(received))
            arrived.append(len(received))
        self.assertEqual(server_transport.value(), sent)
        self.assertLess(arrived[0], len(sent))  # it came over time, not at once

    def test_a_close_follows_the_data(self):
        """The client sends and closes: after the delay the target gets the data, then the close; the connection is gone."""
        self.start(Faults(delay=0.2))
        client, _, server, server_transport = self.connect()
        client.dataReceived(b"bye")
        client.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(0.1)
        self.assertEqual((server_transport.value(), server_transport.disconnecting), (b"", False))
        self.reactor.advance(0.1)
        self.assertEqual((server_transport.value(), server_transport.disconnecting), (b"bye", True))
        self.assertFalse(server_transport.disconnected)  # a clean close, not a reset
        self.assertEqual(len(self.forwarder.connections), 1)
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.forwarder.connections, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_reset_is_passed_on_as_a_reset(self):
        """The target's connection is lost uncleanly: after the delay the client's is aborted, not closed."""
        self.start(Faults(delay=0.2))
        _, client_transport, server, _ = self.connect()
        server.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(0.2)
        self.assertTrue(client_transport.disconnected)

    def test_abort_resets_every_connection_and_the_link_stays_up(self):
        """cut(ABORT) aborts both ends of every connection at once, drops what was on the way; new ones pass."""
        self.start(Faults(delay=0.2))
        ends = [self.connect() for _ in range(2)]
        ends[0][0].dataReceived(b"lost")
        self.proxy.cut(ABORT)
        for client, client_transport, server, server_transport in ends:
            self.assertTrue(client_transport.disconnected and server_transport.disconnected)
            client.connectionLost(Failure(ConnectionLost()))
            server.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(1)
        self.assertEqual([e[3].value() for e in ends], [b"", b""])
        self.assertEqual(self.forwarder.connections, set())
        client, _, _, server_transport = self.connect()
        client.dataReceived(b"again")
        self.reactor.advance(0.2)
        self.assertEqual(server_transport.value(), b"again")

    def test_blackhole_holds_everything_and_closes_nothing_until_restored(self):
        """
        During a blackhole nothing passes either way, a close included, and
        nothing is closed, for as long as it lasts; the restore sends what
        was held, in order, after the delay, as TCP's retransmission would.
        """
        self.start(Faults(delay=0.25))  # times in binary fractions, so the clock's sums are exact
        client, client_transport, server, server_transport = self.connect()
        client.dataReceived(b"one,")
        self.reactor.advance(0.125)
        self.proxy.cut(BLACKHOLE)
        client.dataReceived(b"two,")
        server.dataReceived(b"hp")
        self.reactor.advance(512)
        self.assertEqual((server_transport.value(), client_transport.value()), (b"", b""))
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # held, not ticking
        self.proxy.restore()
        self.reactor.advance(0.125)
        self.assertEqual(server_transport.value(), b"")
        self.reactor.advance(0.125)
        self.assertEqual((server_transport.value(), client_transport.value()), (b"one,two,", b"hp"))

        # A close during a blackhole is held too, and passed on after the restore.
        self.proxy.cut(BLACKHOLE)
        server.dataReceived(b"bye")
        server.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(512)
        self.assertEqual(client_transport.value(), b"hp")
        self.assertFalse(client_transport.disconnecting or client_transport.disconnected)
        self.proxy.restore()
        self.reactor.advance(0.25)
        self.assertEqual(client_transport.value(), b"hpbye")
        self.assertTrue(client_transport.disconnecting)  # the target's close came after its data

    def test_a_connection_made_during_a_blackhole_reaches_the_target_after_the_restore(self):
        """The proxy dials the target for a connection accepted during a blackhole only once the link is back."""
        self.start(Faults(delay=0.2))
        self.proxy.cut(BLACKHOLE)
        _, client_transport = self.accept()
        self.reactor.advance(60)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertFalse(client_transport.disconnecting)
        self.proxy.restore()
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_an_unreachable_target_resets_the_client(self):
        """The target refuses: the client's connection is aborted, with one log line, and forgotten once lost."""
        self.start(Faults())
        client, client_transport = self.accept()
        factory = self.reactor.tcpClients[-1][2]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        self.assertTrue(client_transport.disconnected)
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.forwarder.connections, set())

    def test_an_abort_while_dialling_stops_the_dial_and_resets_the_client(self):
        """A connection still dialling the target when the link is reset: the dial stops, the client is reset."""
        self.start(Faults())
        client, client_transport = self.accept()
        self.proxy.cut(ABORT)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)
        self.assertTrue(client_transport.disconnected)
        self.reactor.tcpClients[-1][2].clientConnectionFailed(self.reactor.connectors[-1], Failure(UserError()))
        client.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.forwarder.connections, set())

    def test_stop_closes_the_port_and_every_connection_and_cancels_timers(self):
        """Stopping aborts every connection, closes the port and leaves no timer; it is done once both ends are lost."""
        self.start(Faults(delay=0.2))
        client, client_transport, server, server_transport = self.connect()
        client.dataReceived(b"in flight")
        stopped = self.proxy.stopService()
        self.assertTrue(self.reactor.tcp_ports[0].stopped)
        self.assertTrue(client_transport.disconnected and server_transport.disconnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertNoResult(stopped)
        client.connectionLost(Failure(ConnectionLost()))
        server.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.successResultOf(stopped)


class UDPForwarderTests(SynchronousTestCase):
    CLIENTS = [("127.0.0.1", 6001), ("127.0.0.1", 6002)]

    def setUp(self):
        self.reactor = FakeReactor()

    def start(self, faults, seed=1):
        self.proxy = FaultProxy(self.reactor, random.Random(seed), faults)
        self.forwarder = self.proxy.udp(0, *TARGET)
        self.proxy.startService()
        self.front = self.reactor.udp_ports[0]

    def upstream(self, client):
        """The fake socket the proxy opened for C{client} towards the target."""
        return self.forwarder.clients[client].port

    def test_each_client_has_its_own_upstream_socket_and_gets_its_own_replies(self):
        """Two clients reach the target from two sockets, after the delay; replies go back to their client."""
        self.start(Faults(delay=0.2))
        for client in self.CLIENTS:
            self.front.protocol.datagramReceived(b"hello from %d" % client[1], client)
        sockets = [self.upstream(client) for client in self.CLIENTS]
        self.assertNotEqual(sockets[0].port, sockets[1].port)
        self.reactor.advance(0.199)
        self.assertEqual([s.sent for s in sockets], [[], []])
        self.reactor.advance(0.001)
        self.assertEqual([s.sent for s in sockets], [[(b"hello from 6001", TARGET)], [(b"hello from 6002", TARGET)]])
        for s in reversed(sockets):
            s.protocol.datagramReceived(b"hp for %d" % s.protocol.client[1], TARGET)
        self.reactor.advance(0.2)
        self.assertEqual(self.front.sent, [(b"hp for 6002", self.CLIENTS[1]), (b"hp for 6001", self.CLIENTS[0])])
        self.assertEqual((self.forwarder.counters["up"], self.forwarder.counters["down"]), (2, 2))

    def test_loss_is_drawn_for_each_datagram_each_way(self):
        """With a seeded random, exactly the datagrams whose draw falls under the loss are lost, up and down."""
        seed, loss = 20, 0.3
        self.start(Faults(loss=loss), seed)
        draws = random.Random(seed)
        expected = {"up": [], "down": []}
        for i in range(100):
            self.front.protocol.datagramReceived(b"%d" % i, self.CLIENTS[0])
            if draws.random() >= loss:
                expected["up"].append((b"%d" % i, TARGET))
        self.reactor.advance(0)
        side = self.upstream(self.CLIENTS[0])
        for i in range(100):
            side.protocol.datagramReceived(b"%d" % i, TARGET)
            if draws.random() >= loss:
                expected["down"].append((b"%d" % i, self.CLIENTS[0]))
        self.reactor.advance(0)
        self.assertEqual((side.sent, self.front.sent), (expected["up"], expected["down"]))
        self.assertEqual((self.forwarder.counters["lost_up"], self.forwarder.counters["lost_down"]),
                         (100 - len(expected["up"]), 100 - len(expected["down"])))
        self.assertTrue(0 < self.forwarder.counters["lost_up"] < 100 and 0 < self.forwarder.counters["lost_down"] < 100)

    def test_jitter_may_reorder_datagrams(self):
        """Datagrams sent together arrive in the order of their own delays, each within delay +- jitter."""
        self.start(Faults(delay=0.1, jitter=0.05), seed=3)
        for i in range(20):
            self.front.protocol.datagramReceived(b"%d" % i, self.CLIENTS[0])
        side = self.upstream(self.CLIENTS[0])
        self.reactor.advance(0.0499)
        self.assertEqual(side.sent, [])
        self.reactor.advance(0.1002)
        order = [int(data) for data, _ in side.sent]
        self.assertEqual(sorted(order), list(range(20)))
        self.assertNotEqual(order, list(range(20)))

    def test_a_blackhole_drops_what_is_on_the_way_and_what_is_sent(self):
        """Cut: datagrams in flight and sent meanwhile are dropped, both ways; after the restore they pass again."""
        self.start(Faults(delay=0.2))
        self.front.protocol.datagramReceived(b"in flight", self.CLIENTS[0])
        side = self.upstream(self.CLIENTS[0])
        self.proxy.cut(BLACKHOLE)
        self.front.protocol.datagramReceived(b"during", self.CLIENTS[0])
        side.protocol.datagramReceived(b"hp", TARGET)
        self.reactor.advance(10)
        self.assertEqual((side.sent, self.front.sent), ([], []))
        self.assertEqual(self.forwarder.counters["cut"], 3)
        self.assertFalse(side.stopped)
        self.proxy.restore()
        self.front.protocol.datagramReceived(b"after", self.CLIENTS[0])
        self.reactor.advance(0.2)
        self.assertEqual(side.sent, [(b"after", TARGET)])

    def test_abort_forgets_the_clients_upstream_sockets(self):
        """cut(ABORT) closes every client's upstream socket: the client's next datagram leaves from a new one."""
        self.start(Faults())
        self.front.protocol.datagramReceived(b"a", self.CLIENTS[0])
        old = self.upstream(self.CLIENTS[0])
        self.proxy.cut(ABORT)
        self.assertTrue(old.stopped)
        self.front.protocol.datagramReceived(b"b", self.CLIENTS[0])
        self.reactor.advance(0)
        new = self.upstream(self.CLIENTS[0])
        self.assertIsNot(new, old)
        self.assertEqual(new.sent, [(b"b", TARGET)])

    def test_stop_closes_every_socket_and_cancels_timers(self):
        """Stopping closes the clients' socket, every upstream socket, and leaves no timer."""
        self.start(Faults(delay=0.2))
        self.front.protocol.datagramReceived(b"a", self.CLIENTS[0])
        self.successResultOf(self.proxy.stopService())
        self.assertTrue(all(port.stopped for port in self.reactor.udp_ports))
        self.assertEqual(len(self.reactor.udp_ports), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class CommandLineTests(SynchronousTestCase):
    def test_arguments_make_the_proxy(self):
        """The options build a TCP and a UDP forwarder with the faults asked for."""
        options = parse_arguments(["--listen", "127.0.0.1:19090", "--to", "127.0.0.1:9090",
                                   "--udp-listen", ":50001", "--udp-to", "localhost:50000",
                                   "--delay-ms", "200", "--jitter-ms", "20", "--loss", "0.05", "--seed", "4"])
        proxy = make_proxy(FakeReactor(), options)
        self.assertEqual(proxy.faults, Faults(delay=0.2, jitter=0.02, loss=0.05))
        tcp, udp = list(proxy)
        self.assertEqual((tcp.target, udp.target), (("127.0.0.1", 9090), ("127.0.0.1", 50000)))

    def test_bad_arguments_stop_with_a_message(self):
        """A loss over 1, a port without a host:port form, a listen without a target: each a usage error."""
        for argv in (["--listen", "127.0.0.1:1", "--to", "127.0.0.1:2", "--loss", "5"],
                     ["--listen", "127.0.0.1:port", "--to", "127.0.0.1:2"],
                     ["--listen", "127.0.0.1:1"],
                     ["--delay-ms", "10"]):
            self.patch(sys, "stderr", io.StringIO())
            self.assertRaises(SystemExit, parse_arguments, argv)
            self.assertIn("error:", sys.stderr.getvalue())


# -- on real loopback sockets --------------------------------------------------------


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Received(Protocol):
    """A client that fires C{arrived} with the time its first bytes came."""

    def __init__(self):
        self.arrived = defer.Deferred()
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        if not self.arrived.called:
            self.arrived.callback((reactor.seconds(), data))

    def connectionLost(self, reason):
        self.lost.callback(None)


class DatagramSink(DatagramProtocol):
    """Counts datagrams; C{when(n)} fires once n have come.  Echoes them if C{echo}."""

    def __init__(self, echo=False):
        self.count, self.echo, self._waiting = 0, echo, []

    def datagramReceived(self, data, address):
        self.count += 1
        if self.echo:
            self.transport.write(data, address)
        for n, d in list(self._waiting):
            if self.count >= n:
                self._waiting.remove((n, d))
                d.callback(reactor.seconds())

    def when(self, n):
        if self.count >= n:
            return defer.succeed(reactor.seconds())
        d = defer.Deferred()
        self._waiting.append((n, d))
        return d


class LoopbackTests(TestCase):
    """The proxy on real sockets and the real reactor: the delay measured by the reactor's clock, no sleeps."""

    timeout = 30

    def started(self, faults, seed=1):
        proxy = FaultProxy(reactor, random.Random(seed), faults)
        self.addCleanup(proxy.stopService)
        return proxy

    def listen_udp(self, protocol):
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_tcp_bytes_really_pass_with_the_delay(self):
        """An echo through the proxy at 100 +- 10 ms each way comes back no sooner than 180 ms later."""
        server = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        proxy = self.started(Faults(delay=0.1, jitter=0.01))
        tcp = proxy.tcp(0, "127.0.0.1", server.getHost().port)
        proxy.startService()
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tcp.port), Received())
        sent = reactor.seconds()
        client.transport.write(b"ping")
        arrived, data = await client.arrived
        self.assertEqual(data, b"ping")
        self.assertGreaterEqual(arrived - sent, 0.18)
        client.transport.loseConnection()
        await client.lost

    async def test_an_abort_resets_real_connections_at_both_ends(self):
        """cut(ABORT) on real sockets: the client and the server each see their connection lost, at once."""
        made = defer.Deferred()

        class Held(Received):
            def connectionMade(self):
                made.callback(self)

        server = reactor.listenTCP(0, Factory.forProtocol(Held), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        proxy = self.started(Faults(delay=0.05))
        tcp = proxy.tcp(0, "127.0.0.1", server.getHost().port)
        proxy.startService()
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", tcp.port), Received())
        client.transport.write(b"hello")
        server_end = await made
        self.assertEqual((await server_end.arrived)[1], b"hello")
        proxy.cut(ABORT)
        await gather([client.lost, server_end.lost])
        self.assertEqual(tcp.connections, set())

    async def test_udp_datagrams_really_pass_with_the_delay(self):
        """A datagram echoed through the proxy at 100 +- 10 ms each way comes back no sooner than 180 ms later."""
        echo = DatagramSink(echo=True)
        proxy = self.started(Faults(delay=0.1, jitter=0.01))
        udp = proxy.udp(0, "127.0.0.1", self.listen_udp(echo))
        proxy.startService()
        me = DatagramSink()
        self.listen_udp(me)
        sent = reactor.seconds()
        me.transport.write(b"hello", ("127.0.0.1", udp.port))
        arrived = await me.when(1)
        self.assertGreaterEqual(arrived - sent, 0.18)
        self.assertEqual(echo.count, 1)

    async def test_udp_loss_over_2000_datagrams_is_what_the_seed_says(self):
        """
        2000 datagrams through 5 % loss: exactly those whose seeded draw
        falls under 0.05 are lost (sent 50 at a time, each batch awaited,
        so the kernel drops none), about 5 % of them.
        """
        seed, loss, total, batch = 2026, 0.05, 2000, 50
        draws = random.Random(seed)
        kept = [draws.random() >= loss for _ in range(total)]
        sink = DatagramSink()
        proxy = self.started(Faults(loss=loss), seed)
        udp = proxy.udp(0, "127.0.0.1", self.listen_udp(sink))
        proxy.startService()
        me = DatagramSink()
        self.listen_udp(me)
        for first in range(0, total, batch):
            for i in range(first, first + batch):
                me.transport.write(b"%d" % i, ("127.0.0.1", udp.port))
            await sink.when(sum(kept[:first + batch]))
        lost = total - sum(kept)
        self.assertEqual((udp.counters["lost_up"], udp.counters["up"], sink.count), (lost, total - lost, total - lost))
        self.assertTrue(0.04 <= lost / total <= 0.06, lost)

    async def test_the_command_line_proxy_forwards(self):
        """C{python -m dreamraid.faultproxy} starts, says it is ready, and forwards a TCP echo."""
        server = reactor.listenTCP(0, Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        port = free_port()
        child = spawn(self, "-m", "dreamraid.faultproxy", "--listen", f"127.0.0.1:{port}",
                      "--to", f"127.0.0.1:{server.getHost().port}", "--delay-ms", "50")
        await child.ready
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Received())
        client.transport.write(b"through")
        _, data = await client.arrived
        self.assertEqual(data, b"through")
        client.transport.loseConnection()
        await client.lost


# -- the client library's route ------------------------------------------------------


class FakeConnection:
    """A game connection that only takes pushes."""

    def __init__(self):
        self.on_push = None


class RouteTests(SynchronousTestCase):
    FOUND = {"raid_id": "r1", "host": "10.0.0.9:9090", "ticket": "t", "udp": "10.0.0.9:50000", "raid_number": 1,
             "member": 0, "key": "00" * 16, "members": [{"user_id": 5}]}

    def routes(self, kind, address):
        return {("tcp", ("10.0.0.9", 9090)): ("127.0.0.1", 19090),
                ("udp", ("10.0.0.9", 50000)): ("127.0.0.1", 50001)}.get((kind, address), address)

    def test_a_routed_client_stays_on_the_proxy_and_sends_datagrams_through_it(self):
        """The raid's advertised host routes to where the client is: no move; its UDP channel uses the routed address."""
        fake = FakeReactor()
        client = GameClient(fake, FakeConnection(), ("127.0.0.1", 19090), 5, route=self.routes)
        client.connection.on_push(packets.RAID_FOUND, dict(self.FOUND))
        found = self.successResultOf(client.next_push("raid_found"))
        self.assertEqual(fake.tcpClients, [])
        self.assertEqual(Raid(client, found).channel.server, ("127.0.0.1", 50001))

    def test_without_a_route_the_client_moves_to_the_advertised_host(self):
        """By default the advertised addresses are used as they are: the client dials the raid's host."""
        fake = FakeReactor()
        client = GameClient(fake, FakeConnection(), ("127.0.0.1", 19090), 5)
        client.connection.on_push(packets.RAID_FOUND, dict(self.FOUND))
        self.assertEqual(fake.tcpClients[0][:2], ("10.0.0.9", 9090))
        self.assertEqual(Raid(client, self.FOUND).channel.server, ("10.0.0.9", 50000))


# -- a whole raid over a bad link, against the real stack ------------------------------


class BadLinkRaidTests(GameServerCase):
    """Two players raid with their TCP and UDP through the fault proxy."""

    timeout = 120
    DELAY, JITTER, LOSS = 0.2, 0.02, 0.05

    async def test_a_raid_clears_over_200_ms_and_5_percent_loss(self):
        """
        Both players' TCP and UDP cross a link of 200 +- 20 ms one way (so
        some 400 ms a round trip) with 5 % of datagrams lost each way, the
        server's default 200 ms between hits: the raid clears, every hit
        counted once; no HP datagram comes sooner than the two delays allow.
        Prints the hit-to-HP-datagram latencies seen.
        """
        prefix = f"testmm{random.getrandbits(40):x}"
        self.addCleanup(lambda: gather([self.router.execute("DEL", key) for key in matchmaking_keys(prefix)]))
        server = await self.game_server("--raids-matchmaking-prefix", prefix, "--raids-match-interval", "0.2")
        udp_host, _, udp_port = server.part("RaidHost").udp_address.rpartition(":")
        proxy = FaultProxy(reactor, random.Random(20), Faults(delay=self.DELAY, jitter=self.JITTER, loss=self.LOSS))
        tcp = proxy.tcp(0, "127.0.0.1", server.port)
        udp = proxy.udp(0, udp_host, int(udp_port))
        proxy.startService()
        self.addCleanup(proxy.stopService)
        routes = {("tcp", ("127.0.0.1", server.port)): ("127.0.0.1", tcp.port),
                  ("udp", (udp_host, int(udp_port))): ("127.0.0.1", udp.port)}

        def through_the_proxy(kind, address):
            return routes.get((kind, address), address)

        clients = []
        for _ in range(2):
            token = await self.entered_token(await self.new_user())
            client = await GameClient.login(reactor, "127.0.0.1", tcp.port, token, route=through_the_proxy)
            self.addCleanup(client.close)
            clients.append(client)
        for client in clients:
            await client.queue_raid()
        raids = await gather([client.next_raid() for client in clients])
        self.assertEqual(len({raid.raid_id for raid in raids}), 1)
        heard = [[], []]  # per player: (time, HP sequence) of each newer HP datagram
        for i, raid in enumerate(raids):
            raid.channel.on_hp = functools.partial(lambda i, hp, sequence: heard[i].append(
                (reactor.seconds(), sequence)), i)
        await gather([raid.fight() for raid in raids])
        moving = [task.LoopingCall(raid.move, 1.0, 2.0, 1) for raid in raids]  # 8 datagrams a second each
        for loop in moving:
            loop.start(0.125)
        try:
            hits, hp, turn = [], 30, 0
            while hp > 0:
                player = turn % 2
                sent = reactor.seconds()
                hit = await raids[player].hit()
                hits.append((player, sent, hit.sequence))
                hp, turn = hit.hp, turn + 1
            # The result closes the UDP channel: first give the last HP datagram (sent twice, no repeats after
            # the end) time to come, as it may come after the result.
            await gather([raid.channel.when_hp(lambda hp: hp == 0).addTimeout(2, reactor).addErrback(
                lambda failure: failure.trap(defer.TimeoutError)) for raid in raids])
            results = await gather([raid.result() for raid in raids])
        finally:
            for loop in moving:
                loop.stop()

        self.assertEqual([(r.cleared, r.team_score) for r in results], [(True, 30), (True, 30)])
        self.assertEqual(sum(r.score for r in results), 30)
        self.assertEqual([sequence for _, _, sequence in hits], list(range(1, len(hits) + 1)))
        self.assertEqual([client.address for client in clients], [("127.0.0.1", tcp.port)] * 2)  # none moved
        self.assertEqual(tcp.counters["accepted"], 2)
        self.assertTrue(udp.counters["lost_up"] > 0 and udp.counters["lost_down"] > 0, udp.counters)

        latencies, missed = [], 0
        for player, sent, sequence in hits:
            seen = [at for at, heard_sequence in heard[player] if heard_sequence >= sequence]
            if seen:
                latencies.append((seen[0] - sent) * 1000)
            else:
                missed += 1  # the last hit, both its HP datagrams lost
        latencies.sort()
        self.assertGreaterEqual(latencies[0], 2 * (self.DELAY - self.JITTER) * 1000)
        p50, p99 = latencies[len(latencies) // 2], latencies[math.ceil(len(latencies) * 0.99) - 1]
        print(f"\nbad link raid (200+-20 ms one way, 5 % datagram loss each way): {len(hits)} hits, "
              f"hit-to-HP-datagram p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {latencies[-1]:.0f} ms, "
              f"{missed} never saw their HP; datagrams up {udp.counters['up']} (lost {udp.counters['lost_up']}), "
              f"down {udp.counters['down']} (lost {udp.counters['lost_down']})", file=sys.stderr)
