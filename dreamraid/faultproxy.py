"""
A fault proxy for tests and benchmarks: it sits between clients and a
server, TCP and UDP, and makes the link between them bad.  This kernel has
no C{tc netem}, so this is how the project makes a slow, jittery, lossy or
broken link.

    proxy = FaultProxy(reactor, random.Random(7), Faults(delay=0.2, jitter=0.02, loss=0.05))
    tcp = proxy.tcp(0, "127.0.0.1", 9090)      # a TCPForwarder; tcp.port once started
    udp = proxy.udp(0, "127.0.0.1", 50000)     # a UDPForwarder
    proxy.startService()
    ...
    proxy.cut(BLACKHOLE)   # the link goes down: nothing passes, nothing is closed
    proxy.restore()        # and comes back
    proxy.cut(ABORT)       # every TCP connection reset at once
    await proxy.stopService()

What each fault does:

  - C{delay} is one way, added in each direction: a request and its reply
    each wait it, so a round trip gains twice the delay.
  - C{jitter}: each chunk or datagram's delay is drawn uniformly from
    C{delay - jitter} to C{delay + jitter} (never below 0).  Datagrams may
    overtake each other, as on a real network.  A TCP stream is never
    reordered: each chunk goes out at C{max(now + its delay, the previous
    chunk's time)}, and so does the end of the stream, after the last
    chunk.
  - C{loss} drops datagrams, drawn independently for each datagram in each
    direction.  It does not apply to TCP: TCP retransmits, so a lost
    segment only shows as delay, and the delay and jitter model that; TCP
    sees delay, jitter and cuts.
  - C{cut(BLACKHOLE)} is a link that went down.  Datagrams are dropped,
    those in flight too.  TCP connections stay open at both ends and carry
    nothing: what either side sends meanwhile, its close included, is held
    and goes out (after the delay, in order) once C{restore()} brings the
    link back, as TCP's retransmission would deliver it; bytes are never
    dropped from the middle of a stream, which no real TCP link does.  A
    connection accepted during the blackhole is held too: the proxy opens
    its upstream connection only once the link is back (a real SYN would
    not have got through).  A side that gives up meanwhile (a heartbeat
    timeout) just closes; the other side hears of it after the restore.
  - C{cut(ABORT)} resets every TCP connection at once (C{abortConnection},
    both ends: each sees its connection lost, as with an RST) and drops
    every datagram in flight; for UDP it also forgets every client's
    upstream socket, so a client's next datagram reaches the server from a
    new port, as after a NAT rebinding.  The link stays up: new connections
    pass.

Each UDP client (source address) gets its own upstream socket, so the
server sees distinct clients and its replies go back to the right one.
There is no flow control: the proxy reads as fast as either side writes and
holds what it delays in memory, which suits a game's traffic, not bulk
transfer.  UDP targets must be IP addresses (the CLI resolves names).

The reactor, the clock and the random source are handed in, so tests drive
the proxy with a C{task.Clock} and a seeded C{random.Random}: the same seed
drops the same datagrams.  Stopping the proxy closes its ports and
connections and cancels its timers.

From the command line (docs/testing.md):

    python -m dreamraid.faultproxy --listen 127.0.0.1:19090 --to 127.0.0.1:9090 \\
        --udp-listen 127.0.0.1:50001 --udp-to 127.0.0.1:50000 --delay-ms 200 --jitter-ms 20 --loss 0.05

C{kill -USR1} blackholes the link, C{kill -USR2} restores it, C{kill -HUP}
resets every TCP connection.
"""

import argparse
import collections
import functools
import heapq
import itertools
import random as random_module
import signal
import socket
import sys
from dataclasses import dataclass

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, UserError
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from twisted.logger import Logger

BLACKHOLE = "blackhole"
ABORT = "abort"
# Seconds the proxy waits for the target to accept its upstream connection.
CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Faults:
    """
    How bad the link is: C{delay} and C{jitter} in seconds, one way, each
    direction; C{loss} the fraction of datagrams dropped, each direction on
    its own.  Replace a proxy's C{faults} at any time: the next chunk or
    datagram follows the new ones.
    """

    delay: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0

    def __post_init__(self):
        for name in ("delay", "jitter"):
            value = getattr(self, name)
            if not 0 <= value < 3600:
                raise ValueError(f"{name}: expected seconds from 0 to 3600, got {value!r}")
        if not 0 <= self.loss <= 1:
            raise ValueError(f"loss: expected a fraction from 0 to 1, got {self.loss!r}")

    def transit(self, random):
        """One chunk's or datagram's time on the link: the delay, give or take up to the jitter, never below 0."""
        if self.jitter <= 0:
            return self.delay
        return max(0.0, self.delay + random.uniform(-self.jitter, self.jitter))

    def lost(self, random):
        """Whether one datagram is lost on the way."""
        return self.loss > 0 and random.random() < self.loss


class _DelayLine:
    """
    Calls waiting for their due time, made in order of due time (ties in
    the order they were put), off one timer.  Held, it makes none and keeps
    them.
    """

    def __init__(self, clock):
        self._clock = clock
        self._waiting = []  # heap of (due, order, call)
        self._order = itertools.count()
        self._timer = None
        self.held = False

    def __len__(self):
        return len(self._waiting)

    def put(self, due, call):
        heapq.heappush(self._waiting, (due, next(self._order), call))
        self._arm()

    def hold(self):
        self.held = True
        self._disarm()

    def release(self):
        """Stop holding: the calls held, in their order, to put again (with new due times)."""
        self.held = False
        waiting, self._waiting = sorted(self._waiting), []
        return [call for _, _, call in waiting]

    def clear(self):
        """Forget every call waiting."""
        self._waiting = []
        self._disarm()

    def _disarm(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self):
        if self.held or not self._waiting:
            return
        due = self._waiting[0][0]
        if self._timer is not None:
            if self._timer.getTime() <= due:
                return
            self._disarm()
        self._timer = self._clock.callLater(max(0.0, due - self._clock.seconds()), self._run, due)

    def _run(self, armed_for):
        self._timer = None
        # What the timer was armed for is due now, even where the clock's
        # sum of floats came out a hair short of it.
        now = max(self._clock.seconds(), armed_for)
        while self._waiting and self._waiting[0][0] <= now and not self.held:
            _, _, call = heapq.heappop(self._waiting)
            call()
        self._arm()


class FaultProxy(MultiService):
    """
    One bad link, with the TCP and UDP forwarders that cross it (L{tcp},
    L{udp}) as children: they share its C{faults}, its random source and its
    state (up, or blackholed).
    """

    _log = Logger()

    def __init__(self, reactor, random, faults=Faults(), clock=None):
        super().__init__()
        self.reactor = reactor
        self.clock = reactor if clock is None else clock
        self.random = random
        self.faults = faults
        self.blackholed = False

    def tcp(self, listen_port, target_host, target_port, interface="127.0.0.1"):
        """A L{TCPForwarder} from C{interface:listen_port} (0: any free port) to the target, started with the proxy."""
        forwarder = TCPForwarder(self, listen_port, target_host, target_port, interface)
        forwarder.setServiceParent(self)
        return forwarder

    def udp(self, listen_port, target_host, target_port, interface="127.0.0.1"):
        """A L{UDPForwarder} from C{interface:listen_port} to the target (an IP address), started with the proxy."""
        forwarder = UDPForwarder(self, listen_port, target_host, target_port, interface)
        forwarder.setServiceParent(self)
        return forwarder

    def cut(self, mode=BLACKHOLE):
        """Cut the link: C{BLACKHOLE} (down until L{restore}) or C{ABORT} (every connection reset now)."""
        if mode == BLACKHOLE:
            self._log.info("fault proxy: link cut (blackhole)")
            self.blackholed = True
            for forwarder in self:
                forwarder.blackhole()
        elif mode == ABORT:
            self._log.info("fault proxy: every connection reset")
            for forwarder in self:
                forwarder.abort()
        else:
            raise ValueError(f"cut: expected {BLACKHOLE!r} or {ABORT!r}, got {mode!r}")

    def restore(self):
        """End a blackhole: what was held goes out, after the delay, in order."""
        if self.blackholed:
            self._log.info("fault proxy: link restored")
            self.blackholed = False
            for forwarder in self:
                forwarder.restore()

    # -- for the forwarders -----------------------------------------------------------

    def due(self):
        """When something put on the link now comes out of it."""
        return self.clock.seconds() + self.faults.transit(self.random)

    def lost(self):
        return self.faults.lost(self.random)


# -- TCP ----------------------------------------------------------------------------


class _Stream:
    """
    One direction of a proxied TCP connection: each chunk, and then the
    end, comes out after the link's delay and never before the one sent
    before it.
    """

    def __init__(self, link):
        self._link = link
        self._line = _DelayLine(link.clock)
        self._last_due = float("-inf")
        if link.blackholed:
            self._line.hold()

    def __len__(self):
        return len(self._line)

    def send(self, call):
        due = max(self._link.due(), self._last_due)
        self._last_due = due
        self._line.put(due, call)

    def hold(self):
        self._line.hold()

    def release(self):
        self._last_due = float("-inf")
        for call in self._line.release():
            self.send(call)

    def clear(self):
        self._line.clear()


class _Connection:
    """
    One client's connection through a L{TCPForwarder}: the client's end,
    the upstream end the proxy opens to the target, and the two streams
    between them.  C{gone} fires once both ends are closed.
    """

    _log = Logger()

    def __init__(self, forwarder, link):
        self._forwarder = forwarder
        self._link = link
        self.client = self.server = None  # transports, once connected
        self.up, self.down = _Stream(link), _Stream(link)  # client -> server, server -> client
        self._dialing = None  # the connector while the upstream connection is being made
        self._client_closed = False
        self._server_closed = True  # until an upstream connection is made
        self.gone = defer.Deferred()

    def accepted(self, transport):
        self.client = transport
        transport.pauseProducing()  # read nothing until the upstream end is there to send it to
        if not self._link.blackholed:
            self.dial()

    def dial(self):
        if self._client_closed or self._dialing is not None or self.server is not None:
            return
        host, port = self._forwarder.target
        self._server_closed = False
        self._dialing = self._link.reactor.connectTCP(host, port, _Dialing(self), timeout=CONNECT_TIMEOUT)

    def server_connected(self, transport):
        self._dialing = None
        self.server = transport
        if self._client_closed:
            transport.loseConnection()
        else:
            self.client.resumeProducing()

    def dial_failed(self, reason):
        self._dialing = None
        self._server_closed = True
        if not self._client_closed:
            if reason.check(UserError) is None:  # not a dial the proxy stopped itself
                self._log.info("fault proxy: cannot reach {host}:{port}: {reason}", host=self._forwarder.target[0],
                               port=self._forwarder.target[1], reason=reason.getErrorMessage())
            self.client.abortConnection()
        self._check_gone()

    def from_client(self, data):
        self._forwarder.counters["bytes_up"] += len(data)
        self.up.send(functools.partial(self._write, "server", data))

    def from_server(self, data):
        self._forwarder.counters["bytes_down"] += len(data)
        self.down.send(functools.partial(self._write, "client", data))

    def client_lost(self, reason):
        self._client_closed = True
        if self._dialing is not None:
            self._dialing.stopConnecting()  # dial_failed follows
        elif not self._server_closed:
            self.up.send(functools.partial(self._close, "server", reason.check(ConnectionDone) is not None))
        self._check_gone()

    def server_lost(self, reason):
        self._server_closed = True
        if not self._client_closed:
            self.down.send(functools.partial(self._close, "client", reason.check(ConnectionDone) is not None))
        self._check_gone()

    def hold(self):
        self.up.hold()
        self.down.hold()

    def release(self):
        self.up.release()
        self.down.release()
        self.dial()  # a connection accepted while the link was down

    def abort(self):
        """Reset both ends now; C{gone}."""
        self.up.clear()
        self.down.clear()
        if self._dialing is not None:
            self._dialing.stopConnecting()
        for transport, closed in ((self.client, self._client_closed), (self.server, self._server_closed)):
            if transport is not None and not closed:
                transport.abortConnection()
        return self.gone

    def _write(self, end, data):
        transport = getattr(self, end)
        closed = self._client_closed if end == "client" else self._server_closed
        if transport is not None and not closed:
            transport.write(data)

    def _close(self, end, cleanly):
        transport = getattr(self, end)
        if transport is not None:
            if cleanly:
                transport.loseConnection()
            else:
                transport.abortConnection()

    def _check_gone(self):
        if self._client_closed and self._server_closed and not self.gone.called:
            self.up.clear()
            self.down.clear()
            self._forwarder.connections.discard(self)
            self.gone.callback(None)


class _ClientEnd(Protocol):
    def __init__(self, connection):
        self.connection = connection

    def connectionMade(self):
        self.connection.accepted(self.transport)

    def dataReceived(self, data):
        self.connection.from_client(data)

    def connectionLost(self, reason):
        self.connection.client_lost(reason)


class _ServerEnd(Protocol):
    def __init__(self, connection):
        self.connection = connection

    def connectionMade(self):
        self.connection.server_connected(self.transport)

    def dataReceived(self, data):
        self.connection.from_server(data)

    def connectionLost(self, reason):
        self.connection.server_lost(reason)


class _Dialing(ClientFactory):
    """The upstream connection of one L{_Connection}."""

    noisy = False  # no log line for every connection and socket

    def __init__(self, connection):
        self.connection = connection

    def buildProtocol(self, addr):
        return _ServerEnd(self.connection)

    def clientConnectionFailed(self, connector, reason):
        self.connection.dial_failed(reason)


class _Accepting(Factory):
    noisy = False  # no log line for every connection and socket

    def __init__(self, forwarder):
        self.forwarder = forwarder

    def buildProtocol(self, addr):
        return _ClientEnd(self.forwarder.new_connection())


class TCPForwarder(Service):
    """
    Accepts TCP connections and forwards each to the target over its
    L{FaultProxy}'s link.  C{port} is the port it listens on, once started;
    C{connections} the L{_Connection}s open now; C{counters}: accepted,
    bytes_up, bytes_down.
    """

    def __init__(self, link, listen_port, target_host, target_port, interface):
        self._link = link
        self._listen = (listen_port, interface)
        self.target = (target_host, target_port)
        self.connections = set()
        self.counters = collections.Counter()
        self.port = None
        self._listening = None

    def startService(self):
        super().startService()
        listen_port, interface = self._listen
        self._listening = self._link.reactor.listenTCP(listen_port, _Accepting(self), interface=interface)
        self.port = self._listening.getHost().port

    def stopService(self):
        super().stopService()
        stopped = [defer.maybeDeferred(self._listening.stopListening)]
        stopped += [connection.abort() for connection in list(self.connections)]
        return defer.gatherResults(stopped).addCallback(lambda _: None)

    def new_connection(self):
        connection = _Connection(self, self._link)
        self.connections.add(connection)
        self.counters["accepted"] += 1
        return connection

    def blackhole(self):
        for connection in self.connections:
            connection.hold()

    def restore(self):
        for connection in list(self.connections):
            connection.release()

    def abort(self):
        for connection in list(self.connections):
            connection.abort()


# -- UDP ----------------------------------------------------------------------------


class _ClientSide(DatagramProtocol):
    """The socket clients send to."""

    noisy = False  # no log line for every connection and socket

    def __init__(self, forwarder):
        self.forwarder = forwarder

    def datagramReceived(self, data, address):
        self.forwarder.from_client(data, address)


class _ServerSide(DatagramProtocol):
    """One client's own socket towards the target."""

    noisy = False  # no log line for every connection and socket

    def __init__(self, forwarder, client):
        self.forwarder = forwarder
        self.client = client
        self.port = None  # its listening port, to close it

    def datagramReceived(self, data, address):
        self.forwarder.from_target(self, data)


class UDPForwarder(Service):
    """
    Forwards datagrams between clients and the target over its
    L{FaultProxy}'s link, each client through its own upstream socket.
    C{port} is the port clients send to, once started; C{counters}: up,
    down (forwarded), lost_up, lost_down (the loss), cut (dropped while
    blackholed or by an abort), unsent (the kernel refused them).
    """

    _log = Logger()

    def __init__(self, link, listen_port, target_host, target_port, interface):
        self._link = link
        self._listen = (listen_port, interface)
        self.target = (target_host, target_port)
        self.clients = {}  # client address -> its _ServerSide
        self.counters = collections.Counter()
        self.port = None
        self._client_side = _ClientSide(self)
        self._listening = None
        self._line = _DelayLine(link.clock)

    def startService(self):
        super().startService()
        listen_port, interface = self._listen
        self._listening = self._link.reactor.listenUDP(listen_port, self._client_side, interface=interface)
        self.port = self._listening.getHost().port

    def stopService(self):
        super().stopService()
        self._line.clear()
        ports = [self._listening] + [side.port for side in self.clients.values()]
        self.clients = {}
        return defer.gatherResults([defer.maybeDeferred(port.stopListening) for port in ports]).addCallback(
            lambda _: None)

    def from_client(self, data, address):
        if self._dropped("up"):
            return
        side = self.clients.get(address)
        if side is None:
            side = self.clients[address] = _ServerSide(self, address)
            side.port = self._link.reactor.listenUDP(0, side, interface="")
        self._line.put(self._link.due(), functools.partial(self._send, side, data, self.target, "up"))

    def from_target(self, side, data):
        if self.clients.get(side.client) is not side or self._dropped("down"):
            return
        self._line.put(self._link.due(), functools.partial(self._send, self._client_side, data, side.client, "down"))

    def blackhole(self):
        self.counters["cut"] += len(self._line)
        self._line.clear()

    def restore(self):
        pass

    def abort(self):
        self.blackhole()
        sides, self.clients = list(self.clients.values()), {}
        for side in sides:
            side.port.stopListening()

    def _dropped(self, direction):
        if self._link.blackholed:
            self.counters["cut"] += 1
            return True
        if self._link.lost():
            self.counters["lost_" + direction] += 1
            return True
        return False

    def _send(self, protocol, data, address, direction):
        if protocol.transport is None:
            return  # its socket closed while the datagram was on the way
        try:
            protocol.transport.write(data, address)
        except OSError as e:
            self.counters["unsent"] += 1
            self._log.debug("fault proxy: datagram to {address} not sent: {error}", address=address, error=e)
            return
        self.counters[direction] += 1


# -- the command line ---------------------------------------------------------------


def _address(text):
    host, _, port = text.rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _ip_address(text):
    host, port = _address(text)
    try:
        return socket.gethostbyname(host), port
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {e}") from None


def _fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {text!r}")
    return value


def _milliseconds(text):
    value = float(text)
    if not 0 <= value < 3_600_000:
        raise argparse.ArgumentTypeError(f"expected milliseconds from 0, got {text!r}")
    return value / 1000


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dreamraid.faultproxy",
                                     description="A TCP and UDP proxy that adds delay, jitter and datagram loss. "
                                                 "kill -USR1 blackholes the link, -USR2 restores it, -HUP resets "
                                                 "every TCP connection.")
    parser.add_argument("--listen", type=_address, help="HOST:PORT to accept TCP connections on")
    parser.add_argument("--to", type=_address, help="HOST:PORT to forward TCP connections to")
    parser.add_argument("--udp-listen", type=_address, help="HOST:PORT to take datagrams on")
    parser.add_argument("--udp-to", type=_ip_address, help="HOST:PORT to forward datagrams to")
    parser.add_argument("--delay-ms", type=_milliseconds, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--jitter-ms", type=_milliseconds, default=0.0, help="each delay drawn from delay +- jitter")
    parser.add_argument("--loss", type=_fraction, default=0.0,
                        help="fraction of datagrams lost, each direction (UDP only: TCP sees delay)")
    parser.add_argument("--seed", type=int, help="seed of the random source (default: random)")
    options = parser.parse_args(argv)
    if (options.listen is None) != (options.to is None):
        parser.error("--listen and --to go together")
    if (options.udp_listen is None) != (options.udp_to is None):
        parser.error("--udp-listen and --udp-to go together")
    if options.listen is None and options.udp_listen is None:
        parser.error("nothing to forward: give --listen and --to, or --udp-listen and --udp-to, or both")
    return options


def make_proxy(reactor, options):
    """The L{FaultProxy} the command line describes (not started)."""
    proxy = FaultProxy(reactor, random_module.Random(options.seed),
                       Faults(delay=options.delay_ms, jitter=options.jitter_ms, loss=options.loss))
    if options.listen is not None:
        proxy.tcp(options.listen[1], *options.to, interface=options.listen[0])
    if options.udp_listen is not None:
        proxy.udp(options.udp_listen[1], *options.udp_to, interface=options.udp_listen[0])
    return proxy


def main(argv=None):
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    options = parse_arguments(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    log = Logger(namespace="dreamraid.faultproxy")
    proxy = make_proxy(reactor, options)
    proxy.startService()
    for forwarder in proxy:
        log.info("fault proxy: {kind} {listen} -> {host}:{port}, delay {delay} s, jitter {jitter} s, loss {loss}",
                 kind="tcp" if isinstance(forwarder, TCPForwarder) else "udp", listen=forwarder.port,
                 host=forwarder.target[0], port=forwarder.target[1], delay=proxy.faults.delay,
                 jitter=proxy.faults.jitter, loss=proxy.faults.loss)
    for number, act in ((signal.SIGUSR1, proxy.cut), (signal.SIGUSR2, proxy.restore),
                        (signal.SIGHUP, functools.partial(proxy.cut, ABORT))):
        signal.signal(number, lambda *_, act=act: reactor.callFromThread(act))
    reactor.addSystemEventTrigger("before", "shutdown", proxy.stopService)
    log.info("fault proxy: ready")
    reactor.run()


if __name__ == "__main__":
    main()
