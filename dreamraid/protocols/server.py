"""
What both servers' client protocols share: dispatching requests to handlers,
replies that echo the request id, error replies for bad frames, pings and
pongs, hello/welcome, and the liveness hooks.

A handler takes the decoded body and returns C{(message, body)} to reply,
C{None} for no reply, or a Deferred or coroutine of either.  A handler that
raises L{RequestRefused} gets an error reply with its code; anything else is
logged and answered with C{INTERNAL_ERROR}.  The game and session protocols
add their handlers to L{ServerProtocol.handlers}.
"""

import inspect

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import dreamraid
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.services.liveness import IPeer


def handles(message, needs_auth=True):
    """Mark a protocol method as the handler of C{message}."""

    def mark(method):
        method.handles = (message, needs_auth)
        return method

    return mark


class HandlerTable(type):
    """Collects the methods marked with L{handles} into C{cls.handlers} by message id."""

    def __init__(cls, name, bases, namespace):
        super().__init__(name, bases, namespace)
        table = {}
        for base in reversed(cls.__mro__[1:]):
            table.update(getattr(base, "handlers", {}))
        for attr, value in namespace.items():
            if hasattr(value, "handles"):
                message, needs_auth = value.handles
                table[message.id] = (attr, needs_auth)
        cls.handlers = table


@implementer(IPeer)
class ServerProtocol(FrameReceiver, metaclass=HandlerTable):
    """One client connection of a server."""

    _log = Logger()
    state = None
    # A handler sets this to close the connection once its reply is written.
    close_after_reply = False

    def connectionMade(self):
        self.MAX_LENGTH = self.factory.max_frame_size
        self.state = self.factory.liveness.connected(self)

    def connectionLost(self, reason):
        self.connected = False
        if self.state is not None:
            self.factory.liveness.disconnected(self.state)

    # -- IPeer --------------------------------------------------------------------

    def send_ping(self, nonce):
        self.transport.write(packets.PING.encode(0, {"nonce": nonce}))

    def drop(self, code):
        self._log.info("dropping {peer}: {code}", peer=self.transport.getPeer(), code=code.name)
        self.transport.write(packets.error_frame(0, code))
        self.transport.loseConnection()

    # -- frames -------------------------------------------------------------------

    def frameReceived(self, frame):
        self.factory.liveness.heard(self.state)
        message, request_id, body = frame
        entry = self.handlers.get(message.id)
        if entry is None:
            self._reply_error(request_id, ErrorCode.NOT_ACCEPTED, f"{message.name} is not accepted here")
            return
        method, needs_auth = entry
        if needs_auth and not self.state.authenticated:
            self._reply_error(request_id, ErrorCode.NOT_AUTHENTICATED)
            return
        metrics = self.factory.metrics
        if metrics is not None:
            timer, started = metrics.request(message), metrics.now()
        try:
            result = getattr(self, method)(body)
        except Exception:
            self._request_failed(Failure(), request_id, message)
            result = None
        if inspect.iscoroutine(result):
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                self._reply, self._request_failed,
                callbackArgs=(request_id,), errbackArgs=(request_id, message),
            )
            if metrics is not None:
                result.addBoth(lambda _: timer.observe(metrics.now() - started))
            return
        self._reply(result, request_id)
        if metrics is not None:
            timer.observe(metrics.now() - started)

    def codecErrorReceived(self, error):
        self.factory.liveness.heard(self.state)
        self._log.debug("bad frame from {peer}: {error}", peer=self.transport.getPeer(), error=error)
        self._reply_error(error.request_id, error.code, str(error))

    def lengthLimitExceeded(self, length):
        self._log.info(
            "frame of {length} bytes from {peer}: over {limit}, closing",
            length=length, peer=self.transport.getPeer(), limit=self.MAX_LENGTH,
        )
        self.transport.write(packets.error_frame(0, ErrorCode.FRAME_TOO_LARGE))
        self.transport.loseConnection()

    def _reply(self, result, request_id):
        if result is not None and self.connected:
            message, body = result
            self.transport.write(message.encode(request_id, body))
            if self.factory.metrics is not None:
                self.factory.metrics.replied(message)
            if self.close_after_reply:
                self.transport.loseConnection()

    def _reply_error(self, request_id, code, detail=None):
        if self.connected:
            self.transport.write(packets.error_frame(request_id, code, detail))
            if self.factory.metrics is not None:
                self.factory.metrics.refused(code)

    def _request_failed(self, failure, request_id, message):
        if failure.check(RequestRefused):
            self._reply_error(request_id, failure.value.code, failure.value.detail)
            return
        self._log.failure(
            "{message} request {request_id} failed", failure, message=message.name, request_id=request_id
        )
        self._reply_error(request_id, ErrorCode.INTERNAL_ERROR)

    # -- handlers -----------------------------------------------------------------

    @handles(packets.PING, needs_auth=False)
    def ping(self, body):
        return packets.PONG, body

    @handles(packets.PONG, needs_auth=False)
    def pong(self, body):
        self.factory.liveness.pong(self.state, body["nonce"])

    @handles(packets.HELLO, needs_auth=False)
    def hello(self, body):
        if body["protocol_version"] != packets.PROTOCOL_VERSION:
            raise RequestRefused(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks protocol {packets.PROTOCOL_VERSION}, "
                f"not {body['protocol_version']}",
            )
        return packets.WELCOME, {
            "protocol_version": packets.PROTOCOL_VERSION,
            "server": f"{self.factory.server_name}/{dreamraid.__version__}",
            "ping_interval_ms": round(self.factory.ping_interval * 1000),
            "max_frame_size": self.factory.max_frame_size,
        }


class ServerFactory(Factory):
    """Builds L{ServerProtocol}s that share one server's liveness and limits."""

    protocol = ServerProtocol
    metrics = None  # or the server's L{dreamraid.services.metrics.Metrics}

    def __init__(self, server_name, settings, liveness):
        self.server_name = server_name
        self.max_frame_size = settings.max_frame_size
        self.ping_interval = settings.ping_interval
        self.liveness = liveness
