"""
What both servers' client protocols share: dispatching requests to handlers,
replies that echo the request id, error replies for bad frames, pings and
pongs, hello/welcome, and the liveness hooks.

Limits: a connection is read at most C{frame_rate} frames a second (past
its budget the server stops reading it until the budget refills, so a flood
waits in TCP's buffers, not in the server's time); its requests go through
token buckets by message (past them, C{RATE_LIMITED}; a run of those closes
it); an address holds at most so many connections (C{TOO_MANY_CONNECTIONS});
and a client that leaves its replies unread (the transport's buffer full)
is no longer read from, then dropped after C{slow_reader_timeout} or
C{write_buffer_limit} more bytes.

A handler takes the decoded body and returns C{(message, body)} to reply,
C{None} for no reply, or a Deferred or coroutine of either.  A handler that
raises L{RequestRefused} gets an error reply with its code; a store that
did not answer (L{STORE_UNAVAILABLE}) gets C{UNAVAILABLE} and a warning at
most once a minute per message; anything else is logged with its traceback
and answered with C{INTERNAL_ERROR}.  The game and session protocols
add their handlers to L{ServerProtocol.handlers}.

Order: a handler marked C{ordered} (those that change who the connection is
or where its player belongs) runs only once every ordered request before it
on the connection has been answered, one at a time in the order they
arrived, however many arrive in one write; its authentication is checked
when it runs, so it may follow C{authenticate} in the same write.  Other
requests are served at once, concurrently (reads and hits stay pipelined),
except that one needing authentication that arrives while the connection
is not authenticated waits its turn with the ordered ones (it may be
waiting behind an C{authenticate}).  A protocol queues its own steps with
L{ServerProtocol.in_order} (the game server's leave when a connection
closes).  Once the connection is closing (a handler set
C{close_after_reply}, a drop), frames still unread and steps not yet run
are ignored.
"""

import collections
import inspect

from twisted.internet import defer, interfaces
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

import dreamraid
from dreamraid.errors import ErrorCode, RequestRefused
from dreamraid.protocols import packets
from dreamraid.protocols.framing import FrameReceiver
from dreamraid.services.failurelog import STORE_UNAVAILABLE, FailureLog
from dreamraid.services.limits import AddressCap, RequestBuckets
from dreamraid.services.liveness import IPeer


# How long a connection over its frame budget goes unread: long enough that
# it is then read many frames at a time, not woken for each one.
BUDGET_WAIT = 0.1


def handles(message, needs_auth=True, ordered=False):
    """
    Mark a protocol method as the handler of C{message}; C{ordered}: it runs
    one at a time, in arrival order, with the connection's other ordered
    requests (see the module's docstring).
    """

    def mark(method):
        method.handles = (message, needs_auth, ordered)
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
                message, needs_auth, ordered = value.handles
                table[message.id] = (attr, needs_auth, ordered)
        cls.handlers = table


@implementer(IPeer, interfaces.IPushProducer)
class ServerProtocol(FrameReceiver, metaclass=HandlerTable):
    """One client connection of a server; the producer of its replies, so the transport says when they back up."""

    _log = Logger()
    state = None
    address = None  # the client's host, counted against the per-address cap
    buckets = None  # its L{RequestBuckets}, if requests are limited
    # A handler sets this to close the connection once its reply (or error) is written.
    close_after_reply = False
    _in_order = None  # the Deferred the connection's ordered steps are chained on
    _steps_waiting = 0  # ordered steps queued or running
    _limited_in_row = 0
    _unread_since = None  # the timer that drops a client not reading its replies
    _unread_bytes = 0
    frame_budget = None  # a L{RequestBuckets} of all frames together, if reading is limited
    _over_budget = None  # the timer that reads the connection again once its frame budget refills
    _held = None  # the frame that found the budget spent
    _reading = True

    def connectionMade(self):
        self.MAX_LENGTH = self.factory.max_frame_size
        if self.factory.rate_limits:
            self.buckets = RequestBuckets(self.factory.clock, self.factory.rate_limits)
        if self.factory.frame_rate is not None:
            self.frame_budget = RequestBuckets(self.factory.clock, {"*": self.factory.frame_rate})
        self.transport.registerProducer(self, True)
        self.state = self.factory.liveness.connected(self)

    def connectionLost(self, reason):
        self.connected = False
        self.stopProducing()
        if self._over_budget is not None:
            self._over_budget.cancel()
            self._over_budget = None
        if self.address is not None:
            self.factory.addresses.release(self.address)
        if self.state is not None:
            self.factory.liveness.disconnected(self.state)

    def write_frame(self, data):
        """Send one encoded frame; a client that reads none of them is dropped past the unread bytes allowed."""
        self.transport.write(data)
        if self._unread_since is not None:
            self._unread_bytes += len(data)
            if self._unread_bytes > self.factory.write_buffer_limit:
                self._drop_slow_reader(f"{self._unread_bytes} bytes unread")

    # -- IPushProducer: the transport's write buffer --------------------------------

    def pauseProducing(self):
        """The client is not reading its replies: read no more of its requests for now."""
        if self._unread_since is None and self.connected:
            self._unread_bytes = 0
            self._unread_since = self.factory.clock.callLater(
                self.factory.slow_reader_timeout, self._drop_slow_reader,
                f"replies unread for {self.factory.slow_reader_timeout} s")
            self._read_or_not()

    def resumeProducing(self):
        """The client caught up: read its requests again."""
        if self._unread_since is not None:
            self._unread_since.cancel()
            self._unread_since = None
            self._read_or_not()

    def stopProducing(self):
        if self._unread_since is not None:
            if self._unread_since.active():
                self._unread_since.cancel()
            self._unread_since = None

    def _read_or_not(self):
        """Read the socket unless the client's replies are backed up or its frame budget is spent."""
        reading = self._unread_since is None and self._over_budget is None
        if reading != self._reading and self.connected:
            self._reading = reading
            (self.transport.resumeProducing if reading else self.transport.pauseProducing)()

    # -- the frame budget -----------------------------------------------------------

    def stringReceived(self, payload):
        if self.transport.disconnecting:
            return  # the rest of a write that arrived with a frame that closed the connection
        if self.frame_budget is not None and not self.frame_budget.allow("*"):
            # Over budget: this frame and the rest already read wait (the framing loop stops), the socket is not read.
            self._held = payload
            self.paused = True
            self.factory.limited["frame_budget"] += 1
            self._over_budget = self.factory.clock.callLater(
                max(BUDGET_WAIT, 1 / self.factory.frame_rate.per_second), self._budget_refilled)
            self._read_or_not()
            return
        super().stringReceived(payload)

    def _budget_refilled(self):
        self._over_budget = None
        self.paused = False
        held, self._held = self._held, None
        self.stringReceived(held)
        if not self.paused:
            self._read_or_not()
            self.dataReceived(b"")  # the frames read before the pause

    def _drop_slow_reader(self, why):
        self._log.info("dropping {peer}: a slow reader, {why}", peer=self.transport.getPeer(), why=why)
        self.factory.limited["slow_reader"] += 1
        self.stopProducing()
        self.transport.abortConnection()

    # -- IPeer --------------------------------------------------------------------

    def send_ping(self, nonce):
        self.write_frame(packets.PING.encode(0, {"nonce": nonce}))

    def drop(self, code):
        self._log.info("dropping {peer}: {code}", peer=self.transport.getPeer(), code=code.name)
        self.write_frame(packets.error_frame(0, code))
        self.transport.loseConnection()

    # -- frames -------------------------------------------------------------------

    def frameReceived(self, frame):
        heard = self.factory.liveness.heard(self.state)
        message, request_id, body = frame
        if self.buckets is not None and not self._within_rate(message.name, request_id):
            return
        if request_id == 0 and message is not packets.PONG:
            self._reply_error(0, ErrorCode.ZERO_REQUEST_ID)  # its answer could not be told from a push
            return
        entry = self.handlers.get(message.id)
        if entry is None:
            self._reply_error(request_id, ErrorCode.NOT_ACCEPTED, f"{message.name} is not accepted here")
            return
        method, needs_auth, ordered = entry
        started = None if self.factory.metrics is None else heard  # liveness and metrics share the clock
        if needs_auth and not self.state.authenticated:
            if self._steps_waiting:  # maybe behind an authenticate
                self._wait_turn(method, needs_auth, request_id, message, body, started)
            else:
                self._reply_error(request_id, ErrorCode.NOT_AUTHENTICATED)
            return
        if ordered:
            self._wait_turn(method, needs_auth, request_id, message, body, started)
            return
        # The hot path (reads, hunts, hits), kept to one call of the handler.
        try:
            result = getattr(self, method)(body)
        except Exception:
            self._request_failed(Failure(), request_id, message, started)
            return
        if inspect.iscoroutine(result):
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addCallbacks(
                self._reply, self._request_failed,
                callbackArgs=(request_id, message, started), errbackArgs=(request_id, message, started),
            )
            return
        self._reply(result, request_id, message, started)

    def _wait_turn(self, *request):
        # Not a lambda in frameReceived: a closure there would slow every request down, ordered or not.
        self.in_order(lambda: self._serve_in_order(*request))

    def _serve_in_order(self, method, needs_auth, request_id, message, body, started):
        """
        An ordered request's turn: run the handler and answer, unless the
        connection is closing; a Deferred that fires once it has answered,
        if it has not yet.
        """
        if self.closing:
            return None
        if needs_auth and not self.state.authenticated:
            self._reply_error(request_id, ErrorCode.NOT_AUTHENTICATED)
            return None
        try:
            result = getattr(self, method)(body)
        except Exception:
            self._request_failed(Failure(), request_id, message, started)
            return None
        if inspect.iscoroutine(result):
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            return result.addCallbacks(
                self._reply, self._request_failed,
                callbackArgs=(request_id, message, started), errbackArgs=(request_id, message, started),
            )
        self._reply(result, request_id, message, started)
        return None

    @property
    def closing(self):
        """Whether the connection is closed or closing: nothing more it sent is served."""
        return not self.connected or self.transport.disconnecting

    def in_order(self, step):
        """
        Run C{step()} (which may return a Deferred) once every step passed
        here before it has finished: the connection's ordered requests, and
        whatever else must not interleave with them.  A step that fails is
        logged; the next runs anyway.
        """
        if self._in_order is None:
            self._in_order = defer.succeed(None)
        self._steps_waiting += 1
        self._in_order.addCallback(lambda _: step())
        self._in_order.addErrback(self._step_failed)
        self._in_order.addBoth(self._step_done)

    def _step_failed(self, failure):
        self._log.failure("an ordered step of {peer} failed", failure, peer=self.transport.getPeer())

    def _step_done(self, _):
        self._steps_waiting -= 1

    def _within_rate(self, name, request_id):
        """
        Whether a request of C{name} is within the connection's rate; if
        not it is refused, and a connection refused C{rate_limited_drop}
        times in a row is closed.
        """
        if self.buckets.allow(name):
            self._limited_in_row = 0
            return True
        self._limited_in_row += 1
        self.factory.limited["requests"] += 1
        if self._limited_in_row >= self.factory.rate_limited_drop:
            self.drop(ErrorCode.RATE_LIMITED)
        else:
            self._reply_error(request_id, ErrorCode.RATE_LIMITED)
        return False

    def codecErrorReceived(self, error):
        self.factory.liveness.heard(self.state)
        if self.buckets is not None and not self._within_rate("*", error.request_id):
            return
        self._reply_error(error.request_id, error.code, str(error))

    def lengthLimitExceeded(self, length):
        self._log.info(
            "frame of {length} bytes from {peer}: over {limit}, closing",
            length=length, peer=self.transport.getPeer(), limit=self.MAX_LENGTH,
        )
        self.write_frame(packets.error_frame(0, ErrorCode.FRAME_TOO_LARGE))
        self.transport.loseConnection()

    def _reply(self, result, request_id, request, started):
        """
        Send C{result} (a reply message and its body, or None) as the answer
        to request C{request_id} of C{request}, which arrived at C{started}
        (None: metrics are off).
        """
        reply = None
        if result is not None and self.connected:
            reply, body = result
            self.write_frame(reply.encode(request_id, body))
            if self.close_after_reply:
                self.transport.loseConnection()
        if started is not None:
            self.factory.metrics.answered(request, reply, started)

    def _reply_error(self, request_id, code, detail=None):
        if self.connected:
            self.write_frame(packets.error_frame(request_id, code, detail))
            if self.factory.metrics is not None:
                self.factory.metrics.refused(code)
            if self.close_after_reply:
                self.transport.loseConnection()

    def _request_failed(self, failure, request_id, message, started):
        if failure.check(RequestRefused):
            self._reply_error(request_id, failure.value.code, failure.value.detail)
        elif failure.check(*STORE_UNAVAILABLE):
            self.factory.store_failures.failed(f"{message.name} requests failed", failure)
            self._reply_error(request_id, ErrorCode.UNAVAILABLE)
        else:
            self._log.failure(
                "{message} request {request_id} failed", failure, message=message.name, request_id=request_id
            )
            self._reply_error(request_id, ErrorCode.INTERNAL_ERROR)
        if started is not None:
            self.factory.metrics.answered(message, None, started)

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


class _Refusal(Protocol):
    """A connection over its address's cap: told why, then closed."""

    def connectionMade(self):
        self.transport.write(packets.error_frame(0, ErrorCode.TOO_MANY_CONNECTIONS))
        self.transport.loseConnection()


class ServerFactory(Factory):
    """Builds L{ServerProtocol}s that share one server's liveness and limits."""

    protocol = ServerProtocol
    metrics = None  # or the server's L{dreamraid.services.metrics.Metrics}
    _log = Logger()

    def __init__(self, server_name, settings, liveness):
        self.server_name = server_name
        self.max_frame_size = settings.max_frame_size
        self.ping_interval = settings.ping_interval
        self.liveness = liveness
        self.clock = liveness.clock
        self.rate_limits = settings.rate_limits
        self.rate_limited_drop = settings.rate_limited_drop
        self.frame_rate = settings.frame_rate
        self.slow_reader_timeout = settings.slow_reader_timeout
        self.write_buffer_limit = settings.write_buffer_limit
        self.addresses = AddressCap(settings.connections_per_address)
        self.limited = collections.Counter()  # what the limits did: requests, connections, slow_reader, frame_budget
        self.store_failures = FailureLog(self._log, self.clock, STORE_UNAVAILABLE)

    def buildProtocol(self, address):
        host = getattr(address, "host", None)
        if host is not None and not self.addresses.admit(host):
            self.limited["connections"] += 1
            return _Refusal()
        protocol = super().buildProtocol(address)
        protocol.address = host
        return protocol
