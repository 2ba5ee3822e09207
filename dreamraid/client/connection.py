"""
The client side of the dreamraid TCP protocol: send requests, await the reply
that echoes each request's id (so requests can be pipelined), answer the
server's pings, and hand pushes to the application.

    client = await connect(reactor, "127.0.0.1", 9090)
    welcome = await client.hello("my-client")
    rtt = await client.ping()
"""

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.python.failure import Failure

from dreamraid import __version__
from dreamraid.errors import ErrorCode
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver

DEFAULT_TIMEOUT = 10.0
# The client's heartbeat: after HEARTBEAT_IDLE seconds with nothing heard it
# pings, and a server silent HEARTBEAT_ANSWER seconds more is taken for dead
# (well inside the server's 15 s idle timeout, which the ping also resets).
HEARTBEAT_IDLE = 5.0
HEARTBEAT_ANSWER = 5.0


class RemoteError(Exception):
    """The server answered a request with an error frame."""

    def __init__(self, code, detail):
        code = _code(code)
        super().__init__(f"{getattr(code, 'name', code)}: {detail}")
        self.code, self.detail = code, detail


class ConnectionClosed(Exception):
    """The connection closed before the reply came; C{code} is the server's reason, if it gave one."""

    def __init__(self, code=None, detail=None):
        super().__init__(f"connection closed ({getattr(code, 'name', code) or 'no reason given'})")
        self.code, self.detail = code, detail


class OutcomeUnknown(ConnectionClosed):
    """
    The connection dropped while a request that changes something was in
    flight: the server may or may not have carried it out.  It is not sent
    again by itself; look (a read) before trying again.
    """

    def __init__(self, message, code=None, detail=None):
        super().__init__(code, detail)
        self.args = (f"outcome unknown: the connection dropped before {message} was answered",)
        self.message = message


class ClientProtocol(FrameReceiver):
    """
    One connection to a dreamraid server.  With C{heartbeat=(idle, answer)}
    it pings a server silent for C{idle} seconds and aborts the connection
    if nothing comes back within C{answer} seconds more (a dead server or a
    dead link that TCP alone would notice only much later).
    """

    def __init__(self, clock, timeout=DEFAULT_TIMEOUT, heartbeat=None):
        self._clock = clock
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._idle_call = None
        self._pending = {}
        self._next_id = 0
        self._nonce = 0
        self.closed = defer.Deferred()
        self.close_reason = None  # (code, detail) of the server's last error push
        self.pushes = []  # pushes received while nobody listens: (message name, body)
        self.on_push = None  # or a callable(message, body)
        self._push_waiters = {}  # message name -> Deferreds from next_push

    def request(self, message, body, timeout=None):
        """
        Send a request; the Deferred fires with the reply's C{(message, body)}.

        It fails with L{RemoteError} on an error reply, L{ConnectionClosed}
        if the connection drops first, and C{defer.TimeoutError} after
        C{timeout} seconds.
        """
        if not self.connected:
            return defer.fail(ConnectionClosed(*(self.close_reason or ())))
        self._next_id = self._next_id % 0xFFFFFFFF + 1
        request_id = self._next_id
        d = defer.Deferred(lambda _: self._pending.pop(request_id, None))
        self._pending[request_id] = d
        self.transport.write(message.encode(request_id, body))
        d.addTimeout(self._timeout if timeout is None else timeout, self._clock)
        return d

    async def hello(self, client_name=f"dreamraid-client/{__version__}"):
        """Introduce the client; returns the welcome body."""
        _, body = await self.request(
            packets.HELLO, {"protocol_version": packets.PROTOCOL_VERSION, "client": client_name}
        )
        return body

    async def ping(self):
        """Round-trip time, in seconds, of one ping."""
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        started = self._clock.seconds()
        _, body = await self.request(packets.PING, {"nonce": self._nonce})
        if body["nonce"] != self._nonce:
            raise RemoteError(ErrorCode.INTERNAL_ERROR, "pong carried another nonce")
        return self._clock.seconds() - started

    def close(self):
        """Close the connection; the Deferred fires once it is closed."""
        self.transport.loseConnection()
        return self.closed

    def connectionMade(self):
        super().connectionMade()
        self._heard()

    def _heard(self):
        """Something came from the server: the heartbeat starts over."""
        if self._heartbeat is None:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._heartbeat[0])
        else:
            self._idle_call = self._clock.callLater(self._heartbeat[0], self._silent)

    def _silent(self):
        """Nothing heard for the idle time: ping, and abort if the answer does not come in time."""
        self._idle_call = None
        if not self.connected:
            return

        def dead(failure):
            failure.trap(defer.TimeoutError)
            if self.connected:
                self.close_reason = None
                self.transport.abortConnection()
        self._nonce = (self._nonce + 1) & 0xFFFFFFFF
        self.request(packets.PING, {"nonce": self._nonce}, timeout=self._heartbeat[1]).addErrback(dead).addErrback(
            lambda failure: None)  # a connection that closed meanwhile: its closing says so

    def stringReceived(self, payload):
        self._heard()
        super().stringReceived(payload)

    def frameReceived(self, frame):
        message, request_id, body = frame
        if request_id == 0:
            self._push(message, body)
            return
        d = self._pending.pop(request_id, None)
        if d is None:
            return  # a reply to a request that timed out or was cancelled
        if message is packets.ERROR:
            d.errback(RemoteError(body["code"], body["detail"]))
        else:
            d.callback((message, body))

    def codecErrorReceived(self, error):
        self.transport.loseConnection()
        self._fail_pending(Failure(error))

    def connectionLost(self, reason):
        self.connected = False
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._fail_pending(Failure(ConnectionClosed(*(self.close_reason or ()))))
        self.closed.callback(None)

    def _push(self, message, body):
        if message is packets.PING:
            self.transport.write(packets.PONG.encode(0, body))
            return
        if message is packets.ERROR:
            self.close_reason = (_code(body["code"]), body["detail"])
        waiters = self._push_waiters.get(message.name)
        if waiters:
            waiters.pop(0).callback(body)
        elif self.on_push is not None:
            self.on_push(message, body)
        else:
            self.pushes.append((message.name, body))

    def next_push(self, name):
        """A Deferred of the body of the next push named C{name}; one received and not yet read comes first."""
        for i, (pushed, body) in enumerate(self.pushes):
            if pushed == name:
                del self.pushes[i]
                return defer.succeed(body)
        waiter = defer.Deferred()
        self._push_waiters.setdefault(name, []).append(waiter)
        return waiter

    def _fail_pending(self, failure):
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(failure)


def _code(value):
    try:
        return ErrorCode(value)
    except ValueError:
        return value


def connect(reactor, host, port, timeout=DEFAULT_TIMEOUT, heartbeat=None):
    """Connect to a dreamraid server; fires with a L{ClientProtocol} (its C{heartbeat}: see there)."""
    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    return connectProtocol(endpoint, ClientProtocol(reactor, timeout, heartbeat))
